"""What the compiler emits: reductions inlined into rollout statements, names that collide with
the generated code, constants in the batch's dtype, numbers without a Python literal, and the
inputs that used to end in internal errors (each now a SpecError at file:line:col)."""

import pytest
import torch

import alignspec
from alignspec.dsl.errors import SpecError

B, T = 4, 3


def _spec(tmp_path, body: str, name="t"):
    p = tmp_path / f"{name}.align"
    p.write_text(f"algorithm {name}\ndata pairs\n" + body)
    return p


def _batch(algo, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {}
    for k, lvl in algo.inputs.items():
        shape = (B, T) if lvl == "action" else (B,)
        batch[k] = torch.randn(*shape, generator=g, dtype=torch.float64)
    batch["mask"] = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.float64)
    batch["logp"] = batch["logp"].clone().requires_grad_(True)
    return batch


def test_token_reduction_inside_an_advantage_expression(tmp_path):
    algo = alignspec.compile(_spec(tmp_path, "advantage\n  A = 1 - sum_tokens(logp_ref)\n"
                                             "loss\n  minimize -mean(A * sum_tokens(logp))\n"))
    b = _batch(algo)
    out = algo.loss(b)
    m = b["mask"]
    A = 1 - (b["logp_ref"] * m).sum(1)
    want = -(A * (b["logp"] * m).sum(1)).mean()
    torch.testing.assert_close(out.loss, want)
    out.loss.backward()
    torch.testing.assert_close(b["logp"].grad, (-A[:, None] * m / B))


def test_token_reduction_inside_a_score_expression(tmp_path):
    algo = alignspec.compile(_spec(tmp_path, "score\n  r = reward(response)\n  w = 1 + last_token(r)\n"
                                             "loss\n  minimize -mean(sum_tokens(w * logp))\n"))
    b = _batch(algo)
    out = algo.loss(b)
    m = b["mask"]
    last = torch.zeros(B, T, dtype=torch.float64)
    for i, n in enumerate(m.sum(1).long()):
        last[i, n - 1] = b["reward"][i]
    torch.testing.assert_close(out.loss, -(((1 + last) * b["logp"] * m).sum(1)).mean())


@pytest.mark.parametrize("name", ["with_metrics", "totals", "batch", "metrics", "dtype", "total", "prompt_ids",
                                  "_tmp", "ROLES"])
def test_names_of_the_generated_code_are_refused(tmp_path, name):
    p = _spec(tmp_path, f"loss\n  {name} = sum_tokens(logp)\n  minimize -mean({name})\n")
    with pytest.raises(SpecError) as e:
        alignspec.load(p)
    msg = str(e.value)
    assert "t.align:4:3" in msg and "taken by the generated code" in msg and "with_metrics" in msg


@pytest.mark.parametrize("word", ["keep", "score", "minimize"])
def test_a_keyword_as_a_name_says_so(tmp_path, word):
    p = _spec(tmp_path, f"loss\n  {word} = sum_tokens(logp)\n  minimize -mean(logp)\n")
    with pytest.raises(SpecError) as e:
        alignspec.load(p)
    assert f"t.align:4:{4 + len(word)}" in str(e.value) and f"'{word}' is a keyword" in str(e.value)


def test_python_names_and_their_underscored_twins_stay_apart(tmp_path):
    # `id` and `len` are Python built-ins (renamed with a trailing _), `id_` is the user's own
    p = _spec(tmp_path, "params\n  len = 2.0\nloss\n  id = sum_tokens(logp)\n  id_ = 3 * id\n"
                        "  minimize -mean(id_ + len * id)\n  minimize term_a = -mean(id)\n"
                        "  minimize a = mean(0 * id)\n")
    algo = alignspec.compile(p)
    b = _batch(algo)
    s = (b["logp"] * b["mask"]).sum(1)
    out = algo.loss(b)
    torch.testing.assert_close(out.loss, -(3 * s + 2 * s).mean() - s.mean() + (0 * s).mean())
    assert set(out.terms) == {"loss", "term_a", "a"}


def test_constants_take_the_batch_dtype(tmp_path):
    algo = alignspec.compile(_spec(tmp_path, "params\n  c = 0.3\nloss\n  x = sum_tokens(logp)\n"
                                             "  minimize -sum(where(x > 1000, 1, c) * x)\n"))
    b = _batch(algo)
    algo.loss(b).loss.backward()
    assert b["logp"].grad[0, 0].item() == -0.3  # float32 0.3 would be -0.30000001192092896


def test_where_on_a_number_condition(tmp_path):
    algo = alignspec.compile(_spec(tmp_path, "params\n  beta = 0.5\nloss\n"
                                             "  minimize -mean(where(beta > 0, 2, 3) * sum_tokens(logp))\n"))
    b = _batch(algo)
    torch.testing.assert_close(algo.loss(b).loss, -(2 * (b["logp"] * b["mask"]).sum(1)).mean())


@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "1e999"])
def test_non_finite_parameters_are_refused(value):
    with pytest.raises(SpecError) as e:
        alignspec.compile("grpo", beta=value)
    assert "grpo.align:" in str(e.value) and "not a finite number" in str(e.value)


@pytest.mark.parametrize("literal,where", [("1e999", "5:7"), ("9" * 400, "5:12")])
def test_numbers_too_large_are_refused(tmp_path, literal, where):
    typ = ": int" if "e" not in literal else ""
    p = _spec(tmp_path, f"params\n  k{typ} = {literal}\nloss\n  minimize -mean(k * sum_tokens(logp))\n")
    p.write_text(p.read_text().replace("data pairs\n", "data pairs\n\n"))
    with pytest.raises(SpecError) as e:
        alignspec.compile(p)
    assert f"t.align:{where}" in str(e.value) and "too large" in str(e.value)


def test_too_large_numbers_in_an_expression(tmp_path):
    p = _spec(tmp_path, "loss\n  minimize -mean(1e999 * sum_tokens(logp))\n")
    with pytest.raises(SpecError) as e:
        alignspec.compile(p)
    assert "t.align:4:18" in str(e.value)


def test_folding_away_every_trained_term_is_an_error():
    with pytest.raises(SpecError) as e:
        alignspec.compile("ampo", beta=0)
    assert "ampo.align:" in str(e.value) and "nothing would learn" in str(e.value)


def test_many_named_terms_compile(tmp_path):
    body = "loss\n" + "".join(f"  minimize t{i} = -mean(sum_tokens(logp))\n" for i in range(3000))
    algo = alignspec.compile(_spec(tmp_path, body))
    b = _batch(algo)
    out = algo.loss(b)
    torch.testing.assert_close(out.loss, -3000 * (b["logp"] * b["mask"]).sum(1).mean())


def test_a_library_has_nothing_to_compile():
    with pytest.raises(SpecError) as e:
        alignspec.compile("common")
    assert "common.align:" in str(e.value) and "library" in str(e.value)


def test_numbers_without_a_python_literal_are_emitted_as_expressions():
    import math

    from alignspec.compiler.passes.lower import _num
    for v in (float("inf"), float("-inf"), 0.3, -2.5, 7):
        assert eval(_num(v), {}) == v
    assert math.isnan(eval(_num(float("nan")), {}))
