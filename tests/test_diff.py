"""Tests for the semantic diff of two specs (dsl/diff.py, `alignspec diff A B`)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from alignspec.dsl.diff import Change, diff_specs, format_json, format_text
from alignspec.dsl.errors import SpecError

ROOT = pathlib.Path(__file__).resolve().parents[1]

GRPO_DAPO = [
    "score: term overlong_penalty(length, max_len, cache) added (max_len = 20480, cache = 4096)",
    "filter added: keep groups where group_std(r) > 0",
    "loss: aggregation mean(mean_tokens(·)) → token_mean_all(·)",
    "loss: term beta * k3(logp, logp_ref) removed",
    "loss: clip upper bound 1 + eps → 1 + eps_high (eps_high = 0.28)",
]

# grpo written differently: comments, other section and statement order, renamed locals,
# commuted sums, products and min arguments, a distributed minus, 1e-4 as 0.0001, a wrapped
# line and generate's default top_p written out.
GRPO_REWRITTEN = """\
# the same algorithm as grpo, written by someone else
algorithm grpo_rewritten
import common

params
  beta = 0.04   # KL weight
  eps = 0.2
  n: int = 8

loss
  # the clipped surrogate, arguments swapped
  surrogate = min(clip(rho, -eps + 1, eps + 1) * adv, adv * rho)
  minimize -mean(mean_tokens(-(beta * k3(logp, logp_ref) - surrogate)))
  rho = exp(-logp_old + logp)

sample
  responses = generate(prompt, temperature = 1.0, top_p = 1.0,
                       n = n)

advantage
  adv = (-group_mean(score_) + score_) / (0.0001 + group_std(score_))

score
  score_ = reward(response)
"""

GRPO_LOSS = """\
loss
  ratio = exp(logp - logp_old)
  pg = min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)
"""


def messages(a, b) -> list[str]:
    return [c.message for c in diff_specs(a, b)]


def builtin_text(name: str) -> str:
    return (ROOT / "algorithms" / f"{name}.align").read_text()


# ---------------------------------------------------------------------------------- acceptance
def test_grpo_to_dapo_names_exactly_dapos_changes():
    changes = diff_specs("grpo", "dapo")
    assert [c.message for c in changes] == GRPO_DAPO
    assert [(c.section, c.kind) for c in changes] == [
        ("score", "added"), ("filter", "added"), ("loss", "changed"), ("loss", "removed"), ("loss", "changed")]
    clip = changes[-1]
    assert (clip.before, clip.after) == ("1 + eps", "1 + eps_high")
    agg = changes[2]
    assert (agg.before, agg.after) == ("mean(mean_tokens(·))", "token_mean_all(·)")


def test_dapo_to_grpo_is_the_reverse():
    assert messages("dapo", "grpo") == [
        "score: term overlong_penalty(length, max_len, cache) removed",
        "filter removed: keep groups where group_std(r) > 0",
        "loss: aggregation token_mean_all(·) → mean(mean_tokens(·))",
        "loss: term beta * k3(logp, logp_ref) added",
        "loss: clip upper bound 1 + eps_high → 1 + eps",
    ]


def test_paths_and_text_refs_work_like_names():
    path = str(ROOT / "algorithms" / "dapo.align")
    assert messages("grpo", path) == GRPO_DAPO
    assert messages(builtin_text("grpo"), "dapo") == GRPO_DAPO


# ---------------------------------------------------------------------------------- no difference
@pytest.mark.parametrize("name", ["grpo", "dapo", "dpo", "ppo", "rlhf", "sppo", "mcts", "spin"])
def test_a_spec_against_itself(name):
    assert diff_specs(name, name) == []
    assert format_text(diff_specs(name, name)) == "no semantic difference"


def test_rewritten_grpo_is_the_same():
    assert messages("grpo", GRPO_REWRITTEN) == []
    assert messages(GRPO_REWRITTEN, "grpo") == []


def test_unused_statement_and_unused_param_default_are_no_difference():
    # dapo does not use beta; a statement nothing reads changes nothing
    text = builtin_text("dapo").replace("algorithm dapo extends grpo", "algorithm dapo2 extends grpo") \
        .replace("  eps_high = 0.28", "  beta = 0.5\n  eps_high = 0.28") \
        .replace("  ratio = exp(logp - logp_old)", "  ratio = exp(logp - logp_old)\n  unused = 2 * ratio")
    assert messages("dapo", text) == []


# ---------------------------------------------------------------------------------- params
def test_param_default_change():
    text = builtin_text("dpo").replace("beta = 0.1 ", "beta = 0.5 ")
    assert "beta = 0.5" in text
    changes = diff_specs("dpo", text)
    assert [c.message for c in changes] == ["params: beta 0.1 → 0.5"]
    assert (changes[0].section, changes[0].kind, changes[0].before, changes[0].after) == \
        ("params", "changed", "0.1", "0.5")


def test_new_param_value_is_told_once():
    text = "algorithm g2 extends grpo\nparams\n  hi = 0.3\n" + GRPO_LOSS.replace("1 + eps)", "1 + hi)") + \
        "  minimize -mean(mean_tokens(pg - beta * k3(logp, logp_ref))) + 0 * hi\n"
    # both changes name the new param; its value is appended to the first one only
    assert messages("grpo", text) == ["loss: term 0 * hi added (hi = 0.3)", "loss: clip upper bound 1 + eps → 1 + hi"]


# ---------------------------------------------------------------------------------- loss
def test_kl_term_removed():
    text = "algorithm grpo_nokl extends grpo\n" + GRPO_LOSS + "  minimize -mean(mean_tokens(pg))\n"
    changes = diff_specs("grpo", text)
    assert [c.message for c in changes] == ["loss: term beta * k3(logp, logp_ref) removed"]
    assert (changes[0].kind, changes[0].before, changes[0].after) == ("removed", "beta * k3(logp, logp_ref)", None)
    assert messages(text, "grpo") == ["loss: term beta * k3(logp, logp_ref) added"]


def test_kl_term_through_a_local_name_is_still_the_same():
    text = "algorithm g2 extends grpo\n" + GRPO_LOSS + \
        "  kl = k3(logp, logp_ref) * beta\n  minimize -mean(mean_tokens(pg - kl))\n"
    assert messages("grpo", text) == []


def test_aggregation_change_alone():
    text = "algorithm g2 extends grpo\n" + GRPO_LOSS + \
        "  minimize -token_mean_all(pg - beta * k3(logp, logp_ref))\n"
    assert messages("grpo", text) == ["loss: aggregation mean(mean_tokens(·)) → token_mean_all(·)"]


def test_def_call_compared_by_name():
    text = "algorithm g2 extends grpo\n" + GRPO_LOSS + \
        "  minimize -mean(mean_tokens(pg - beta * k2(logp, logp_ref)))\n"
    assert messages("grpo", text) == ["loss: k3(logp, logp_ref) → k2(logp, logp_ref)"]


def test_changed_weight_of_a_term():
    text = "algorithm g2 extends grpo\n" + GRPO_LOSS + \
        "  minimize -mean(mean_tokens(pg - 2 * beta * k3(logp, logp_ref)))\n"
    assert messages("grpo", text) == ["loss: term beta * k3(logp, logp_ref) → 2 * beta * k3(logp, logp_ref)"]


def test_named_minimize_terms_added_and_matched_by_name():
    base = "algorithm a\nimport common\n" + builtin_text("grpo").split("import common", 1)[1]
    base = base.replace("minimize -mean", "minimize policy = -mean")
    extra = base.replace("algorithm a\n", "algorithm b\n") + \
        "  minimize bonus = -0.01 * token_mean_all(entropy)\n"
    assert messages(base, extra) == ["loss: term bonus added: -0.01 * token_mean_all(entropy)"]
    assert messages(extra, base) == ["loss: term bonus removed: -0.01 * token_mean_all(entropy)"]


# ---------------------------------------------------------------------------------- other sections
def test_score_change_reported_once_under_score():
    text = "algorithm g2 extends grpo\nscore\n  r = 2 * reward(response)\n"
    changes = diff_specs("grpo", text)
    assert [c.message for c in changes] == ["score: r = reward(response) → 2 * reward(response)"]
    assert changes[0].section == "score"


def test_advantage_change_reported_under_advantage():
    text = "algorithm g2 extends grpo\nadvantage\n  A = r - group_mean(r)\n"
    assert messages("grpo", text) == ["advantage: division by group_std(r) + 1e-4 removed"]
    text = "algorithm g2 extends grpo\nadvantage\n  A = (r - group_mean(r)) / (group_std(r) + 1e-6)\n"
    assert messages("grpo", text) == ["advantage: denominator group_std(r) + 1e-4 → group_std(r) + 1e-6"]


def test_sampler_n_changed():
    text = "algorithm g2 extends grpo\nsample\n  responses = generate(prompt, n = 16, temperature = 1.0)\n"
    changes = diff_specs("grpo", text)
    assert [c.message for c in changes] == ["sample: generate n n → 16"]
    assert (changes[0].section, changes[0].before, changes[0].after) == ("sample", "n", "16")


def test_filter_removed():
    text = builtin_text("dapo").replace("filter\n  keep groups where group_std(r) > 0\n", "")
    assert "keep groups" not in text
    changes = diff_specs("dapo", text)
    assert [c.message for c in changes] == ["filter removed: keep groups where group_std(r) > 0"]
    assert (changes[0].section, changes[0].kind, changes[0].after) == ("filter", "removed", None)


def test_filter_changed():
    text = builtin_text("dapo").replace("group_std(r) > 0", "group_std(r) > 0.1")
    assert messages("dapo", text) == ["filter: keep groups where group_std(r) > 0 → group_std(r) > 0.1"]
    same = builtin_text("dapo").replace("group_std(r) > 0", "0 < group_std(r)")
    assert messages("dapo", same) == []


def test_train_setting():
    text = "algorithm g2 extends grpo\ntrain\n  epochs = 4\n  minibatches = 1\n"
    assert messages("grpo", text) == ["train: epochs 1 → 4"]


def test_selects_compared_by_role():
    text = builtin_text("ampo").replace("chosen = argmax(r)", "chosen = argmin(r)")
    assert "argmin" in text
    assert messages("ampo", text) == ["select: chosen = argmax(r) → argmin(r)"]


# ---------------------------------------------------------------------------------- formats, errors
def test_format_text_and_json_round_trip():
    changes = diff_specs("grpo", "dapo")
    assert format_text(changes) == "\n".join(GRPO_DAPO)
    assert format_text([]) == "no semantic difference"
    data = json.loads(format_json(changes))
    assert [set(d) for d in data] == [{"section", "kind", "message", "before", "after"}] * len(changes)
    assert [Change(**d) for d in data] == changes
    assert json.loads(format_json([])) == []


def test_broken_spec_is_a_spec_error():
    with pytest.raises(SpecError):
        diff_specs("grpo", "algorithm bad extends grpo\nloss\n  minimize -mean(nope)\n")
    with pytest.raises(SpecError):
        diff_specs("no_such_spec", "grpo")


def test_diff_does_not_import_torch():
    code = ("import sys; from alignspec.dsl.diff import diff_specs; diff_specs('grpo', 'dapo'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("a,b", [("ppo", "grpo"), ("grpo", "ppo")])
def test_every_changed_section_is_reported_even_when_the_loss_changed_too(a, b):
    msgs = [c.message for c in diff_specs(a, b)]
    score = [m for m in msgs if m.startswith("score:")]
    adv = [m for m in msgs if m.startswith("advantage:")]
    assert len(score) == 1 and "reward_model(response)" in score[0] and "reward(response)" in score[0]
    assert len(adv) == 1 and "gae(" in adv[0] and "whiten(" in adv[0] and "group_std(r)" in adv[0]
    first = score[0].index("reward_model") < score[0].index("→")
    assert first == (a == "ppo")  # the direction follows the arguments


def test_a_split_statement_is_no_section_change(tmp_path):
    one = tmp_path / "one.align"
    one.write_text("algorithm one\nimport common\nparams\n  n: int = 4\nsample\n  x = generate(prompt, n = n)\n"
                   "score\n  r = reward(response)\nadvantage\n  A = (r - group_mean(r)) / (group_std(r) + 1e-4)\n"
                   "loss\n  minimize -mean(mean_tokens(exp(logp - logp_old) * A))\n")
    two = tmp_path / "two.align"
    two.write_text(one.read_text().replace("algorithm one", "algorithm two").replace(
        "  A = (r - group_mean(r)) / (group_std(r) + 1e-4)",
        "  d = r - group_mean(r)\n  A = d / (group_std(r) + 1e-4)").replace("minimize -mean(mean_tokens(exp(",
                                                                             "minimize -mean(sum_tokens(exp("))
    msgs = [c.message for c in diff_specs(str(one), str(two))]
    assert msgs == ["loss: aggregation mean(mean_tokens(·)) → mean(sum_tokens(·))"]


ROLLOUT = """\
algorithm {name}
params
  n: int = 4
sample
  responses = rollout(prompt, env = env, n = n{extra})
score
  r = env_reward(response)
loss
  minimize -mean(mean_tokens(logp) * (r - group_mean(r)))
"""


def test_rollout_defaults_written_out_are_no_difference_and_options_are_compared():
    a = ROLLOUT.format(name="a", extra="")
    same = ROLLOUT.format(name="b", extra=", max_turns = 4, temperature = 1.0, top_p = 1.0")
    assert diff_specs(a, same) == []
    changed = diff_specs(a, ROLLOUT.format(name="c", extra=", max_turns = 8"))
    assert [c.section for c in changed] == ["sample"] and changed[0].message == "sample: rollout max_turns 4 → 8"
