"""Tree search sampler: scores, selection, backup, a hand-traced search, and pair extraction."""

import math

import pytest

from alignspec.runtime.rollout.tree_search import (
    Node, StepTask, backup, best_path, expand, iter_nodes, puct_score, search, select,
    sibling_pairs, uct_score,
)


def make(node, text, visits, value_sum, prior, terminal=False):
    child = node.add_child(text, prior, terminal)
    child.visits, child.value_sum = visits, value_sum
    return child


@pytest.fixture
def tree():
    """root (N=10) -> A (N=6, W=3, P=.2), B (N=4, W=3, P=.3), C (unvisited, P=.5);
    B -> B1 (N=3, W=3, P=.5), B2 (N=1, W=0, P=.5)."""
    root = Node("", "Q", visits=10, value_sum=6.0)
    a = make(root, "A", 6, 3.0, 0.2)
    b = make(root, "B", 4, 3.0, 0.3)
    c = make(root, "C", 0, 0.0, 0.5)
    b1 = make(b, "1", 3, 3.0, 0.5, terminal=True)
    b2 = make(b, "2", 1, 0.0, 0.5, terminal=True)
    return root, a, b, c, b1, b2


def test_q_and_prefix(tree):
    root, a, b, c, b1, _ = tree
    assert a.q == 0.5 and b.q == 0.75 and c.q == 0.0
    assert b1.prefix == "QB1" and b1.depth == 2 and b1.parent is b


def test_puct_scores(tree):
    root, a, b, c, *_ = tree
    s10 = math.sqrt(10)
    assert puct_score(root, a, 1.0) == pytest.approx(0.5 + 0.2 * s10 / 7)    # 0.590351
    assert puct_score(root, b, 1.0) == pytest.approx(0.75 + 0.3 * s10 / 5)   # 0.939737
    assert puct_score(root, c, 1.0) == pytest.approx(0.5 * s10)              # 1.581139
    assert puct_score(root, b, 0.2) == pytest.approx(0.787947, abs=1e-6)


def test_uct_scores(tree):
    root, a, b, c, *_ = tree
    assert uct_score(root, a, 1.0) == pytest.approx(0.5 + math.sqrt(math.log(10) / 6))  # 1.119484
    assert uct_score(root, b, 1.0) == pytest.approx(1.508714, abs=1e-6)
    assert uct_score(root, c, 1.0) == math.inf


def test_select_follows_the_formula(tree):
    root, a, b, c, b1, _ = tree
    # c=1: the unvisited C wins on its prior (1.581 > 0.940 > 0.590)
    assert select(root, 1.0) is c
    # c=0.2: B (0.788) beats A (0.518) and C (0.316); under B (N=4): B1 1 + .2*.5*2/4 = 1.05
    # beats B2 0 + .2*.5*2/2 = 0.1
    assert select(root, 0.2) is b1
    assert select(root, 0.2, rule="uct") is c       # unvisited -> +inf
    c.visits, c.value_sum = 1, 0.0
    # UCT, c=1: C 0 + sqrt(ln 10 / 1) = 1.517427 > B 1.508714 > A 1.119484
    assert select(root, 1.0, rule="uct") is c
    with pytest.raises(ValueError):
        select(root, 1.0, rule="nope")


def test_select_ties_go_to_first_child():
    root = Node("", "Q", visits=3)
    first = make(root, "x", 1, 0.5, 0.5)
    make(root, "y", 1, 0.5, 0.5)
    assert select(root, 1.0) is first
    fresh = Node("", "Q")                           # N(s)=0: every PUCT score is 0
    make(fresh, "x", 0, 0.0, 0.1)
    make(fresh, "y", 0, 0.0, 0.9)
    assert select(fresh, 1.0).text == "x"


def test_backup_updates_the_path_only(tree):
    root, a, b, c, b1, b2 = tree
    backup(b1, 0.5)
    assert (b1.visits, b1.value_sum) == (4, 3.5)
    assert (b.visits, b.value_sum) == (5, 3.5)
    assert (root.visits, root.value_sum) == (11, 6.5)
    assert (a.visits, a.value_sum) == (6, 3.0)
    assert (b2.visits, b2.value_sum) == (1, 0.0)
    assert (c.visits, c.value_sum) == (0, 0.0)


def test_expand_merges_duplicates():
    node = Node("", "Q")
    calls = []

    def propose(prefix, k):
        calls.append((prefix, k))
        return [("s", 0.25, False), ("t", 0.5, False), ("s", 0.25, True)]

    kids = expand(node, propose, 3)
    assert calls == [("Q", 3)]
    assert [(k.text, k.prior, k.terminal, k.prefix, k.depth) for k in kids] == [
        ("s", 0.5, True, "Qs", 1), ("t", 0.5, False, "Qt", 1)]
    with pytest.raises(ValueError):
        expand(node, propose, 3)


TOY = {"Q": [("a", 0.6, False), ("b", 0.4, False)],
       "Qa": [("x", 0.5, True), ("y", 0.5, True)],
       "Qb": [("z", 1.0, True)]}
TOY_VALUES = {"Qa": 0.5, "Qb": 0.9, "Qax": 1.0, "Qay": 0.0, "Qbz": 0.2}


def stats(root):
    return {n.prefix: (n.visits, round(n.value_sum, 9)) for n in iter_nodes(root)}


def test_search_matches_hand_trace():
    """c_puct=2, depth 2. Hand trace (a node is expanded on its second visit, the root on
    its first; an unvisited leaf is evaluated itself):
    1. root: expand a, b; N(root)=0 so both score 0 -> a (first); v(a)=.5
    2. root N=1: a .5+2*.6*1/2=1.1, b 0+2*.4*1=.8 -> a; a visited: expand x, y (both
       2*.5*1/1=1, tie) -> x; v=1
    3. root N=2: a .75+1.2*1.414/3=1.316, b .8*1.414=1.131 -> a; x 1+1.414/2=1.707,
       y 1.414 -> x, terminal: evaluated again, v=1
    4. root N=3: a .833+1.2*1.732/4=1.353, b .8*1.732=1.386 -> b, unvisited: v(b)=.9
    5. root N=4: a .833+1.2*2/4=1.433, b .9+.8*2/2=1.7 -> b; expand z -> z; v=.2
    6. root N=5: a .833+1.2*2.236/4=1.504, b .55+.8*2.236/3=1.146 -> a; x 1+1.732/3=1.577,
       y 1.732 -> y; v=0
    """
    calls = []

    def propose(prefix, k):
        calls.append((prefix, k))
        return TOY[prefix]

    expected = [
        {"Q": (1, .5), "Qa": (1, .5), "Qb": (0, 0)},
        {"Q": (2, 1.5), "Qa": (2, 1.5), "Qax": (1, 1), "Qay": (0, 0)},
        {"Q": (3, 2.5), "Qa": (3, 2.5), "Qax": (2, 2)},
        {"Q": (4, 3.4), "Qb": (1, .9), "Qa": (3, 2.5)},
        {"Q": (5, 3.6), "Qb": (2, 1.1), "Qbz": (1, .2), "Qa": (3, 2.5)},
        {"Q": (6, 3.6), "Qa": (4, 2.5), "Qax": (2, 2), "Qay": (1, 0), "Qb": (2, 1.1)},
    ]
    for k, want in enumerate(expected, start=1):
        calls.clear()
        root = search("Q", propose, lambda p, t: TOY_VALUES[p], simulations=k, branching=2,
                      depth=2, c_puct=2.0)
        got = stats(root)
        assert set(want) <= set(got), k
        for prefix, (n, w) in want.items():
            assert got[prefix] == (n, pytest.approx(w)), (k, prefix)
    # each node expanded once, on its second visit; terminals never
    assert calls == [("Q", 2), ("Qa", 2), ("Qb", 2)]

    pairs = sibling_pairs(root)
    assert [(p.prefix, p.chosen, p.rejected) for p in pairs] == [("Q", "a", "b"), ("Qa", "x", "y")]
    assert (pairs[0].q_chosen, pairs[0].q_rejected) == (pytest.approx(0.625), pytest.approx(0.55))
    assert pairs[1].chosen_terminal and not pairs[0].chosen_terminal
    assert [n.text for n in best_path(root)] == ["a", "x"]
    # deterministic
    again = search("Q", propose, lambda p, t: TOY_VALUES[p], 6, 2, 2, 2.0)
    assert stats(again) == stats(root)


def test_sibling_pairs_and_best_path_on_hand_tree(tree):
    root, a, b, c, b1, b2 = tree
    pairs = sibling_pairs(root)
    # root: visited A (.5), B (.75) -- C unvisited is ignored; B: B1 (1.0) vs B2 (0.0)
    assert [(p.prefix, p.chosen, p.rejected, p.q_chosen, p.q_rejected) for p in pairs] == [
        ("Q", "B", "A", 0.75, 0.5), ("QB", "1", "2", 1.0, 0.0)]
    assert [(p.prefix, p.chosen) for p in sibling_pairs(root, min_gap=0.3)] == [("QB", "1")]
    # most visited: A (6) at the root, A is a leaf
    assert best_path(root) == [a]
    a.visits, a.value_sum = 4, 2.0                   # tie with B at 4: higher Q -> B, then B1
    assert best_path(root) == [b, b1]


def test_depth_limit_respected():
    calls = []

    def propose(prefix, k):
        calls.append(prefix)
        return [(f"{len(prefix)}a", 0.5, False), (f"{len(prefix)}b", 0.5, False)]

    root = search("Q", propose, lambda p, t: 0.5, simulations=20, branching=2, depth=1, c_puct=1.0)
    assert calls == ["Q"]
    assert all(not ch.children for ch in root.children)
    assert root.visits == 20 and sum(ch.visits for ch in root.children) == 20

    root = search("Q", propose, lambda p, t: 0.5, simulations=50, branching=2, depth=3, c_puct=1.0)
    depths = [n.depth for n in iter_nodes(root)]
    assert max(depths) == 3


def test_terminal_nodes_not_expanded():
    calls = []

    def propose(prefix, k):
        calls.append(prefix)
        return [("end", 1.0, True)]

    root = search("Q", propose, lambda p, t: 1.0 if t else 0.0, 10, 3, 5, 1.0)
    assert calls == ["Q"]
    (end,) = root.children
    assert end.terminal and end.children == [] and end.visits == 10 and end.q == 1.0


def test_step_task():
    task = StepTask()
    assert StepTask.prompt([2, 3, 4]) == "2+3+4=\n"
    assert task.solution("2+3+4=\n") == ["5+4=\n", "9"]
    assert task.is_correct("2+3+4=\n5+4=\n9")
    assert not task.is_correct("2+3+4=\n5+4=\n10")
    assert not task.is_correct("2+3+4=\n5+4=\n")
    assert not task.is_correct("2+3+4=\n6+4=\n9")           # right answer, wrong step
    assert not task.is_correct("2+3+4=\n9")                  # steps skipped
    assert task.on_track("2+3+4=\n5+4=\n") and not task.on_track("2+3+4=\n6+4=\n")
    props = task.propose("2+3+4=\n", 3)
    assert props == [("5+4=\n", 1 / 3, False), ("6+4=\n", 1 / 3, False), ("4+4=\n", 1 / 3, False)]
    assert [t for t, _, term in task.propose("2+3+4=\n5+4=\n", 2) if term] == ["9", "10"]
    rows = task.records(5)
    assert rows == task.records(5) and all(r["prompt"].endswith("=\n") for r in rows)


def test_search_on_step_task_finds_the_solution():
    task = StepTask()
    reversed_propose = lambda p, k: task.propose(p, k)[::-1]   # correct step proposed last
    root = search("2+3+4=\n", reversed_propose, task.oracle_value, simulations=16, branching=3,
                  depth=4, c_puct=1.5)
    path = best_path(root)
    assert [n.text for n in path] == ["5+4=\n", "9"]
    assert path[-1].terminal and task.is_correct(path[-1].prefix)
    pairs = sibling_pairs(root)
    assert pairs and all(task.on_track(p.prefix + p.chosen) for p in pairs)
    assert all(not task.on_track(p.prefix + p.rejected) for p in pairs)
