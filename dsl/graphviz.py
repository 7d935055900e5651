"""A checked spec's graph as Graphviz DOT text, or drawn to SVG/PNG with matplotlib.

DOT is written directly (no pydot); SVG and PNG are drawn by matplotlib over a layered
layout from networkx, so no Graphviz installation is needed. Nodes are labelled with their
operation (or statement name) and level; edges run from arguments to their users.
"""

from __future__ import annotations

import networkx as nx

_COLORS = {"action": "#cfe2ff", "response": "#d1e7dd", "group": "#fff3cd", "batch": "#f8d7da", None: "#eeeeee"}


def label(a: dict) -> str:
    op = a["op"]
    if op == "input":
        text = a["quantity"]
    elif op in ("const", "str"):
        text = repr(a["value"])
    elif op == "param":
        text = f"{a['name_ref']} = {a['value']!r}"
    elif op == "external":
        text = f"{a['fn']}(response)"
    elif op == "minimize":
        text = f"minimize {a['term']}"
    elif op == "select":
        text = f"{a['role']} = {a['fn']}"
    elif op == "def":
        text = f"{a['fn']}(…)"
    elif op == "index":
        text = f"[{a['role']}]"
    else:
        text = op
    if a.get("name") and a["op"] not in ("input",):
        text = f"{a['name']} = {text}"
    return f"{text}\\n{a['level'] or ''}"


def to_dot(g: nx.DiGraph, name: str = "spec") -> str:
    lines = [f'digraph "{name}" {{', "  rankdir=TB;", '  node [shape=box, style="rounded,filled", fontname="Helvetica"];']
    for n, a in g.nodes(data=True):
        lab = label(a).replace('"', '\\"')
        span = a.get("span")
        tip = f"{span.file}:{span.line}" if span is not None and span.line else ""
        lines.append(f'  {n} [label="{lab}", fillcolor="{_COLORS.get(a["level"], "#eeeeee")}", tooltip="{tip}"];')
    for u, v in g.edges():
        lines.append(f"  {u} -> {v};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def draw(g: nx.DiGraph, path: str, fmt: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for layer, nodes in enumerate(nx.topological_generations(g)):
        for n in nodes:
            g.nodes[n]["_layer"] = layer
    pos = nx.multipartite_layout(g, subset_key="_layer", align="horizontal")
    pos = {n: (x, -y) for n, (x, y) in pos.items()}
    width = max(8, 1.6 * max((len(l) for l in nx.topological_generations(g)), default=1))
    height = max(6, 1.2 * (max((a["_layer"] for _, a in g.nodes(data=True)), default=0) + 1))
    fig, ax = plt.subplots(figsize=(width, height))
    nx.draw_networkx_edges(g, pos, ax=ax, arrows=True, arrowsize=8, edge_color="#888888")
    for n, a in g.nodes(data=True):
        x, y = pos[n]
        ax.text(x, y, label(a).replace("\\n", "\n"), ha="center", va="center", fontsize=7,
                bbox=dict(boxstyle="round", fc=_COLORS.get(a["level"], "#eeeeee"), ec="#555555"))
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, format=fmt)
    plt.close(fig)
    for _, a in g.nodes(data=True):
        a.pop("_layer", None)
