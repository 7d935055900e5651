"""What a spec can name without defining it: runtime quantities, functions, samplers, selectors.

This table is the single place that says which level each function takes and gives; the
checker, the compiler and the docs read it.
"""

from __future__ import annotations

from dataclasses import dataclass

LEVELS = ("batch", "group", "response", "action")  # coarse → fine
RANK = {lvl: i for i, lvl in enumerate(LEVELS)}

# Phases, in the order a rollout computes them.
PHASES = ("const", "score", "model", "loss")


@dataclass(frozen=True)
class Quantity:
    name: str
    level: str
    phase: str  # "score": known right after scoring; "model": needs a no-grad forward; "loss": per update
    grad: bool
    requires: tuple[str, ...]
    doc: str


QUANTITIES = {q.name: q for q in [
    Quantity("logp", "action", "loss", True, ("policy",), "log-prob of each action under the trained policy"),
    Quantity("logp_old", "action", "model", False, ("policy",), "log-prob under the policy that sampled (no grad)"),
    Quantity("logp_ref", "action", "model", False, ("reference",), "log-prob under the frozen reference model"),
    Quantity("entropy", "action", "loss", True, ("policy",), "policy entropy at each position"),
    Quantity("value", "action", "loss", True, ("critic",), "critic estimate (value head)"),
    Quantity("value_old", "action", "model", False, ("critic",), "critic estimate before the update"),
    Quantity("rm_score", "response", "loss", True, ("reward_head",),
             "score of the reward model being trained (sequence-classification head)"),
    Quantity("entropy_old", "action", "model", False, ("policy",),
             "policy entropy at each position, from the no-grad forward before the updates"),
    Quantity("logp_sampler", "action", "score", False, ("sampler_logprobs",),
             "log-prob of each sampled token as the sampler drew it (its temperature, its own forward)"),
    Quantity("label", "response", "score", False, (), "data unpaired: 1 for a desirable completion, 0 otherwise"),
    Quantity("logp_mismatch", "response", "model", False, ("policy", "mismatch"),
             "data unpaired: summed log-prob of the row's completion after the next row's prompt "
             "(a mismatched pair of the same batch), under the policy before the update"),
    Quantity("logp_ref_mismatch", "response", "model", False, ("reference", "mismatch"),
             "data unpaired: the same mismatched pair under the reference model"),
    Quantity("mask", "action", "score", False, (), "1 on valid actions"),
    Quantity("length", "response", "score", False, (), "number of valid actions of each response"),
    Quantity("mu_sqdist_ref", "action", "loss", True, ("flow", "reference"),
             "flow policies: mean over latent elements of (mu_theta - mu_ref)^2 per denoising step"),
    Quantity("step_std", "action", "score", False, ("flow",), "flow policies: SDE noise std of each step"),
]}

# Names the generated module itself uses (compiler/passes/lower.py): a spec may not name a
# parameter or statement with one of these, nor with a name that starts with "_" (the
# generated code's temporaries and term variables).
GENERATED_NAMES = frozenset({
    "batch", "totals", "with_metrics", "torch", "F", "ops", "math", "mask", "metrics", "terms", "loss",
    "total", "keep", "rows", "picks", "out", "GROUP", "SAMPLE_GROUP", "ROLES", "n_rows", "score",
    "advantage", "dtype",
    # keys of the runtime's batch (runtime/engine.py) that carried values must not replace
    "prompt_ids", "prompt_mask", "completion_ids", "completion_mask"})

# Words of the grammar: they cannot name a value.
KEYWORDS = ("algorithm", "and", "data", "def", "extends", "false", "import", "keep", "library", "minimize",
            "not", "or", "true", "where")

# The largest integer a spec may write (a torch int64); larger numbers take an exponent.
MAX_INT = 2 ** 63 - 1

# Names that only make sense as arguments of samplers and scorers.
PSEUDO = {"prompt", "response"}
ROLES = {"chosen", "rejected"}


@dataclass(frozen=True)
class Fn:
    name: str
    kind: str          # elementwise | reduce | group | scan | external | sampler | selector
    args: tuple[str, ...]       # names of positional arguments (used in messages and diffs)
    optional: int = 0           # how many trailing positional arguments may be omitted
    takes: tuple[str, ...] = () # allowed input levels of the first argument (reduce/group/scan)
    gives: str | None = None    # output level; None = same as input
    rollout_only: bool = False  # may not read gradient-carrying values
    linear: bool = False        # sums over the batch: may appear in a loss (micro-batch exact)
    min_group: int = 1          # smallest group size it makes sense for
    kwargs: tuple[str, ...] = ()
    doc: str = ""


def _ew(name, *args, doc=""):
    return Fn(name, "elementwise", tuple(args), doc=doc)


FUNCTIONS: dict[str, Fn] = {f.name: f for f in [
    # elementwise
    *[_ew(n, "x") for n in ("exp", "log", "log1p", "expm1", "abs", "sqrt", "square", "sigmoid", "logsigmoid",
                            "softplus", "relu", "tanh", "sign")],
    _ew("stopgrad", "x", doc="the value without its gradient"),
    _ew("min", "first", "second"), _ew("max", "first", "second"),
    _ew("clip", "value", "lower bound", "upper bound"),
    _ew("where", "condition", "if true", "if false"),
    # reductions
    Fn("sum_tokens", "reduce", ("x",), takes=("action",), gives="response"),
    Fn("mean_tokens", "reduce", ("x",), takes=("action",), gives="response"),
    Fn("token_mean_all", "reduce", ("x",), takes=("action",), gives="batch", linear=True),
    Fn("token_sum_all", "reduce", ("x",), takes=("action",), gives="batch", linear=True),
    Fn("mean", "reduce", ("x",), takes=("response", "group"), gives="batch", linear=True),
    Fn("sum", "reduce", ("x",), takes=("response", "group"), gives="batch", linear=True),
    Fn("batch_std", "reduce", ("x",), takes=("response", "group"), gives="batch", rollout_only=True),
    Fn("group_mean", "group", ("x",), takes=("response",), gives="group"),
    Fn("group_sum", "group", ("x",), takes=("response",), gives="group"),
    Fn("group_max", "group", ("x",), takes=("response",), gives="group"),
    Fn("group_min", "group", ("x",), takes=("response",), gives="group"),
    Fn("group_logsumexp", "group", ("x",), takes=("response",), gives="group"),
    Fn("group_std", "group", ("x",), takes=("response",), gives="group", min_group=2),
    Fn("loo_mean", "group", ("x",), takes=("response",), gives="response", min_group=2),
    Fn("winrate", "group", ("scores",), takes=("response",), gives="response", min_group=2),
    Fn("whiten", "scan", ("x",), takes=("action", "response"), gives=None, rollout_only=True),
    Fn("gae", "scan", ("rewards", "values", "gamma", "lam"), takes=("action",), gives="action",
       rollout_only=True),
    # order statistics over the whole batch (every process's rows), once per rollout
    Fn("batch_rank", "order", ("x",), takes=("response", "group"), rollout_only=True,
       doc="rank of each value among the batch's (0 = smallest)"),
    Fn("batch_sorted", "order", ("x", "rank"), takes=("response", "group"), rollout_only=True,
       doc="the batch's values of x sorted ascending, read at each row's rank"),
    Fn("batch_quantile", "order", ("x", "q"), takes=("action", "response", "group"), gives="batch",
       rollout_only=True, doc="the q-quantile of the batch's (valid) values"),
    Fn("last_token", "scan", ("x",), takes=("response",), gives="action"),
    Fn("suffix_sum", "scan", ("x",), takes=("action",), gives="action"),
    # external scorers: bound by the run's configuration
    Fn("reward", "external", ("response",), gives="response", doc="reward function(s) of the run"),
    Fn("reward_model", "external", ("response",), gives="response", doc="a reward model's score"),
    Fn("preference", "external", ("response",), gives="response",
       doc="a pairwise preference model's score s, with P(i > j) = sigmoid(s_i - s_j)"),
    Fn("embedding", "external", ("response",), gives="response", doc="an embedding of each response"),
    Fn("env_reward", "external", ("response",), gives="response",
       doc="the sum of the rewards the environment gave an episode of rollout(...)"),
    # samplers
    Fn("generate", "sampler", ("prompt",), kwargs=("n", "temperature", "top_p", "top_k", "min_p",
                                                   "repetition_penalty", "model", "max_tokens")),
    Fn("demonstration", "sampler", ("prompt",)),
    Fn("concat", "sampler", ("first", "second", "third", "fourth"), optional=2),
    Fn("tree_search", "sampler", ("prompt",), kwargs=("simulations", "branching", "depth", "c_puct",
                                                      "temperature")),
    Fn("flow_sde", "sampler", ("prompt",), kwargs=("n", "steps", "noise")),
    Fn("rollout", "sampler", ("prompt",), kwargs=("env", "n", "max_turns", "temperature", "top_p", "max_tokens",
                                                  "model"),
       doc="n multi-turn episodes per prompt with the run configuration's environment (env) or tools; "
           "model = reference samples them with the reference policy"),
    # selectors
    Fn("argmax", "selector", ("x",)), Fn("argmin", "selector", ("x",)),
    Fn("top_k", "selector", ("x", "k")), Fn("bottom_k", "selector", ("x", "k")),
    Fn("coreset", "selector", ("x", "embedding", "k")),
    Fn("opt_select", "selector", ("x", "embedding", "k")),
    # pipelines
    Fn("run", "stage", ("spec",), kwargs=("init", "reference", "reward_model")),
]}

EXTERNAL_REQUIRES = {"reward": "reward", "reward_model": "reward_model",
                     "preference": "preference_model", "embedding": "embedding", "env_reward": "env"}

SECTIONS = ("params", "sample", "score", "filter", "select", "advantage", "loss", "train", "pipeline")
DATA_KINDS = ("prompts", "demonstrations", "pairs", "unpaired")
# Quantities that exist only for some data kinds or samplers.
UNPAIRED_ONLY = ("label", "logp_mismatch", "logp_ref_mismatch")
TRAIN_KEYS = {"epochs": int, "minibatches": int, "iterations": int, "reference": str,
              "logprob_temperature": object}
REFERENCE_MODES = ("fixed", "iterate")
