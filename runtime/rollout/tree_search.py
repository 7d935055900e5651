"""Monte-Carlo tree search over reasoning steps, and the training pairs it yields.

A node is a partial solution: the prompt followed by the steps taken so far. Every child's
``prefix`` is its parent's ``prefix`` + its ``text``, verbatim: a step's text carries its own
separator (a trailing newline in ``StepTask``), so ``prefix + chosen`` is exactly the text
the policy is scored on. The search knows nothing about models; two callbacks bind it:

- ``propose(prefix, k) -> [(step_text, prior, is_terminal), ...]`` samples ``k`` candidate
  next steps (the engine: ``k`` continuations of one step from the policy LM, prior =
  exp(length-normalised log-prob), normalised over siblings);
- ``value_fn(prefix, terminal) -> float`` in [0, 1] (the engine: the task's reward at a
  terminal node, a rollout / value estimate otherwise).

One simulation (``search``): **select** from the root by PUCT (or UCT) down to a leaf. A
leaf reached for the first time is **evaluated** as it is; a leaf reached again (or the
root) that is neither terminal nor at the depth limit is **expanded** (one ``propose``
call) and the best of its new children by the same rule is evaluated. The value is
**backed up** along the path to the root (N += 1, W += v; Q = W / N).

Afterwards ``sibling_pairs`` gives step-level preference pairs (children of one node with the
highest vs the lowest Q) and ``best_path`` the most visited line of play.
Everything here is deterministic given deterministic callbacks.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

Propose = Callable[[str, int], "list[tuple[str, float, bool]]"]
ValueFn = Callable[[str, bool], float]


@dataclass(eq=False)
class Node:
    text: str                      # the step that led here ("" at the root)
    prefix: str                    # prompt + all steps from the root to here
    prior: float = 1.0             # P(a|s)
    visits: int = 0                # N
    value_sum: float = 0.0         # W
    children: list[Node] = field(default_factory=list)
    parent: Node | None = field(default=None, repr=False)
    terminal: bool = False
    depth: int = 0                 # number of steps from the root

    @property
    def q(self) -> float:
        return self.value_sum / self.visits if self.visits else 0.0

    def add_child(self, text: str, prior: float, terminal: bool = False) -> Node:
        child = Node(text, self.prefix + text, prior, terminal=terminal, parent=self,
                     depth=self.depth + 1)
        self.children.append(child)
        return child


# -- selection ---------------------------------------------------------------------------

def puct_score(parent: Node, child: Node, c_puct: float) -> float:
    """AlphaZero's PUCT: Q(s,a) + c_puct * P(a|s) * sqrt(N(s)) / (1 + N(s,a))."""
    return child.q + c_puct * child.prior * math.sqrt(parent.visits) / (1 + child.visits)


def uct_score(parent: Node, child: Node, c: float) -> float:
    """UCT: Q(s,a) + c * sqrt(ln N(s) / N(s,a)); an unvisited child scores +inf."""
    if child.visits == 0:
        return math.inf
    return child.q + c * math.sqrt(math.log(parent.visits) / child.visits)


RULES = {"puct": puct_score, "uct": uct_score}


def best_child(node: Node, c: float, rule: str = "puct") -> Node:
    """The child with the highest score under ``rule``; ties go to the first child."""
    score = RULES[rule]
    return max(node.children, key=lambda ch: score(node, ch, c))  # max keeps the first


def select(root: Node, c_puct: float, rule: str = "puct") -> Node:
    """Descend from ``root`` by the highest score to a node without children."""
    if rule not in RULES:
        raise ValueError(f"unknown selection rule {rule!r} (expected one of {sorted(RULES)})")
    node = root
    while node.children:
        node = best_child(node, c_puct, rule)
    return node


# -- expansion, evaluation, backup -------------------------------------------------------

def expand(node: Node, propose: Propose, branching: int) -> list[Node]:
    """Add the children proposed for ``node`` (one ``propose(prefix, branching)`` call).

    Proposals with the same text are merged into one child (first position kept, priors
    summed, terminal if any copy is), then the priors are renormalised to sum to 1, so a
    step sampled twice counts twice. Returns the new children ([] if nothing was proposed).
    """
    if node.children:
        raise ValueError("node is already expanded")
    merged: dict[str, list] = {}
    for text, prior, terminal in propose(node.prefix, branching):
        if text in merged:
            merged[text][0] += float(prior)
            merged[text][1] = merged[text][1] or bool(terminal)
        else:
            merged[text] = [float(prior), bool(terminal)]
    total = sum(p for p, _ in merged.values())
    for text, (prior, terminal) in merged.items():
        node.add_child(text, prior / total if total > 0 else 1.0 / len(merged), terminal)
    return node.children


def evaluate(node: Node, value_fn: ValueFn) -> float:
    return float(value_fn(node.prefix, node.terminal))


def backup(node: Node, value: float) -> None:
    """N += 1 and W += value on ``node`` and each of its ancestors (nothing else)."""
    while node is not None:
        node.visits += 1
        node.value_sum += value
        node = node.parent


def search(prompt: str, propose: Propose, value_fn: ValueFn, simulations: int, branching: int,
           depth: int, c_puct: float, rule: str = "puct") -> Node:
    """Run ``simulations`` simulations from ``prompt``; return the root of the tree.

    A node is expanded on its second visit (the root on the first): a leaf with N = 0 is
    first evaluated itself, so that ``propose`` -- the costly call -- is spent only on
    nodes the search came back to, and every node's first value is its own. Terminal
    nodes and nodes ``depth`` steps down are never expanded: reaching one evaluates it
    again (a stochastic ``value_fn`` is thereby averaged). After an expansion the child to
    evaluate is picked by the selection rule; with PUCT at the unvisited root (first
    simulation) every score is 0, so the first proposal is taken.
    """
    root = Node(text="", prefix=prompt)
    for _ in range(simulations):
        node = select(root, c_puct, rule)
        expandable = not node.terminal and node.depth < depth
        if expandable and (node.visits > 0 or node is root) and expand(node, propose, branching):
            node = best_child(node, c_puct, rule)
        backup(node, evaluate(node, value_fn))
    return root


# -- reading the tree --------------------------------------------------------------------

@dataclass
class StepPair:
    """Two sibling steps after the same ``prefix``: ``chosen`` has the higher Q.
    ``*_terminal`` says whether the step ended the solution (the engine scores it with EOS)."""
    prefix: str
    chosen: str
    rejected: str
    q_chosen: float
    q_rejected: float
    chosen_terminal: bool = False
    rejected_terminal: bool = False


def iter_nodes(root: Node):
    """All nodes, depth-first, parents before children, children in order."""
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(node.children))


def sibling_pairs(root: Node, min_gap: float = 0.0) -> list[StepPair]:
    """One pair per expanded node: among its visited children, highest Q (chosen) vs lowest
    Q (rejected), kept when the gap exceeds ``min_gap``. Ties go to the earlier child."""
    pairs = []
    for node in iter_nodes(root):
        visited = [ch for ch in node.children if ch.visits > 0]
        if len(visited) < 2:
            continue
        hi = max(visited, key=lambda ch: ch.q)
        lo = min(visited, key=lambda ch: ch.q)
        if hi.q - lo.q > min_gap:
            pairs.append(StepPair(node.prefix, hi.text, lo.text, hi.q, lo.q,
                                  hi.terminal, lo.terminal))
    return pairs


def best_path(root: Node) -> list[Node]:
    """The nodes below the root along the most visited child at each level (ties: higher Q,
    then the earlier child); stops at a leaf or where no child was visited."""
    path, node = [], root
    while node.children:
        node = max(node.children, key=lambda ch: (ch.visits, ch.q))
        if node.visits == 0:
            break
        path.append(node)
    return path


# -- a step-structured toy task ----------------------------------------------------------

class StepTask:
    """Sums of several digits solved one partial sum per line.

    The prompt is the sum and a newline, ``"2+3+4=\\n"``; each step adds the first two terms
    and rewrites the rest, ending in the answer: ``"5+4=\\n"``, then ``"9"`` (the terminal
    step has no newline; the engine ends it with EOS). A step is terminal when it has no
    ``=``. ``propose`` is a scripted, deterministic proposer for tests and a default tree:
    the correct step then wrong ones (first partial sum off by +1, -1, +2, ...), uniform
    priors; ``oracle_value`` is 1 while every step so far is the right partial sum.
    """

    name = "builtin:step_addition"

    def __init__(self, terms: int = 3, seed: int = 0):
        if terms < 2:
            raise ValueError("a StepTask sum needs at least two terms")
        self.terms, self.seed = terms, seed

    def records(self, n: int = 64, seed: int | None = None) -> list[dict]:
        rng = random.Random(self.seed if seed is None else seed)
        rows = []
        for _ in range(n):
            xs = [rng.randint(0, 9) for _ in range(self.terms)]
            rows.append({"prompt": self.prompt(xs), "answer": str(sum(xs))})
        return rows

    @staticmethod
    def prompt(xs) -> str:
        return "+".join(map(str, xs)) + "=\n"

    @staticmethod
    def _lines(prefix: str) -> list[str]:
        return [ln for ln in prefix.split("\n") if ln]

    @staticmethod
    def _terms(line: str) -> list[int] | None:
        if not line.endswith("="):
            return None
        try:
            return [int(t) for t in line[:-1].split("+")]
        except ValueError:
            return None

    @staticmethod
    def step(xs: list[int], first: int | None = None) -> str:
        """The step that replaces the first two terms of ``xs`` by ``first`` (their sum by
        default): ``"5+4=\\n"`` or, for the last two, the answer ``"9"``."""
        head = xs[0] + xs[1] if first is None else first
        rest = [head] + xs[2:]
        return str(head) if len(rest) == 1 else "+".join(map(str, rest)) + "=\n"

    @staticmethod
    def is_terminal_step(text: str) -> bool:
        return "=" not in text

    def solution(self, prompt: str) -> list[str]:
        """The correct steps for ``prompt``."""
        xs, steps = self._terms(self._lines(prompt)[0]), []
        while len(xs) > 1:
            steps.append(self.step(xs))
            xs = [xs[0] + xs[1]] + xs[2:]
        return steps

    def _check(self, prefix: str) -> list[int] | None:
        """The terms left after the steps in ``prefix`` if every step is the right partial
        sum of the line before it (the answer being the last one); None otherwise."""
        lines = self._lines(prefix)
        xs = self._terms(lines[0].strip()) if lines else None
        for ln in lines[1:]:
            if xs is None or len(xs) < 2 or ln.strip() != self.step(xs).strip():
                return None
            xs = [xs[0] + xs[1]] + xs[2:]
        return xs

    def is_correct(self, prefix: str) -> bool:
        """Every step is the right partial sum and the text ends in the final answer."""
        xs = self._check(prefix)
        return xs is not None and len(xs) == 1 and not prefix.endswith("\n")

    def on_track(self, prefix: str) -> bool:
        """Every step so far is the right partial sum."""
        return self._check(prefix) is not None

    def propose(self, prefix: str, k: int) -> list[tuple[str, float, bool]]:
        xs = self._terms(self._lines(prefix)[-1])
        if xs is None or len(xs) < 2 or k < 1:
            return []
        s = xs[0] + xs[1]
        firsts, delta = [s], 1
        while len(firsts) < k:
            for cand in (s + delta, s - delta):
                if cand >= 0 and len(firsts) < k:
                    firsts.append(cand)
            delta += 1
        steps = [self.step(xs, f) for f in firsts]
        return [(t, 1.0 / k, self.is_terminal_step(t)) for t in steps]

    def oracle_value(self, prefix: str, terminal: bool) -> float:
        return float(self.is_correct(prefix) if terminal else self.on_track(prefix))
