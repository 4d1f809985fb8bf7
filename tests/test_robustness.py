"""The robustness attacks of `jax_unlearn.eval.robustness`: quantization against a NumPy
restatement, quantized models, the relearning attack's copy and determinism, the recovered
fraction, and the attacks through `EvalSuite`, ``jax-unlearn eval`` and a run config."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_fixtures import make_workspace
from flax import nnx

from jax_unlearn import cli
from jax_unlearn.config import ConfigError, load_config
from jax_unlearn.eval.robustness import (
    LINEAR,
    QuantScheme,
    RelearnConfig,
    Relearner,
    parse_scheme,
    quantize_model,
    quantize_rtn,
    recovered_fraction,
)
from jax_unlearn.eval.suite import flatten
from jax_unlearn.models import CausalLM, ModelConfig, add_lora


def rtn_numpy(w: np.ndarray, bits: int, group: int | None) -> np.ndarray:
    """Restatement, one group of columns at a time (all rows at once): GPTQ's asymmetric min/max
    grid with 0 inside it."""
    w = np.asarray(w, np.float32)
    out = np.empty_like(w)
    n = w.shape[-1]
    g = n if group is None else group
    for start in range(0, n, g):
        x = w[..., start:start + g]
        lo, hi = np.minimum(x.min(-1, keepdims=True), 0), np.maximum(x.max(-1, keepdims=True), 0)
        both_zero = (lo == 0) & (hi == 0)
        lo, hi = np.where(both_zero, np.float32(-1), lo), np.where(both_zero, np.float32(1), hi)
        scale = ((hi - lo) / np.float32(2 ** bits - 1)).astype(np.float32)
        zero = np.round(-lo / scale)
        q = np.clip(np.round(x / scale) + zero, 0, 2 ** bits - 1)
        out[..., start:start + g] = scale * (q - zero)
    return out


@pytest.mark.parametrize("bits, group", [(8, None), (4, None), (4, 128), (8, 128), (3, 7)])
def test_quantize_rtn_equals_the_restatement(bits, group):
    rng = np.random.default_rng(bits)
    w = rng.normal(size=(2, 5, 300)).astype(np.float32) * np.linspace(0.01, 1.0, 300, dtype=np.float32)
    w[0, 1] = 0.0  # an all-zero row: grid [-1, 1], zeros stay exact
    w[1, 2] = np.abs(w[1, 2]) + 0.5  # a row of positives only: 0 still inside the grid
    got = np.asarray(quantize_rtn(jnp.asarray(w), bits, group))
    want = rtn_numpy(w, bits, group)
    # the same float32 operations: equal up to one rounding of the largest magnitude
    np.testing.assert_allclose(got, want, rtol=0, atol=2 * np.finfo(np.float32).eps * np.abs(w).max())
    assert np.all(got[0, 1] == 0.0)
    g = 300 if group is None else group
    for start in range(0, 300, g):  # at most 2^bits levels per group; error at most half a step
        block, orig = got[..., start:start + g], w[..., start:start + g]
        lo, hi = np.minimum(orig.min(-1), 0), np.maximum(orig.max(-1), 0)
        step = np.where(hi > lo, (hi - lo) / (2 ** bits - 1), 2 / (2 ** bits - 1))
        assert all(len(np.unique(b)) <= 2 ** bits for b in block.reshape(-1, block.shape[-1]))
        assert np.all(np.abs(block - orig) <= step[..., None] / 2 * (1 + 1e-5))


def test_int4_range_groups_and_dtype():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(3, 260)), jnp.bfloat16)
    per_channel, grouped = quantize_rtn(w, 4), quantize_rtn(w, 4, 128)
    assert per_channel.dtype == jnp.bfloat16 and per_channel.shape == w.shape
    assert not np.array_equal(np.asarray(per_channel), np.asarray(grouped))  # control: groups change the grid
    assert np.array_equal(np.asarray(quantize_rtn(w, 4, 1000)), np.asarray(per_channel))  # group > row: one group
    # codes of a group lie in [0, 15]: 16 levels, none outside the group's [lo, hi]
    x = np.asarray(w, np.float32)[0, :128]
    lo, hi = min(x.min(), 0), max(x.max(), 0)
    q = (np.asarray(grouped, np.float32)[0, :128] - lo) / ((hi - lo) / 15)
    assert q.min() > -0.6 and q.max() < 15.6
    for name, scheme in (("int8", QuantScheme(8)), ("int4_g128", QuantScheme(4, 128))):
        assert parse_scheme(name) == scheme and scheme.name == name
    for bad in ("int1", "int16", "fp8", "int4_g0", "int4g128"):
        with pytest.raises(ValueError, match="bits|group|int<bits>"):
            parse_scheme(bad)


def tiny_model(seed: int = 0, scan: bool = False) -> CausalLM:
    from jax_unlearn.models import ModelOptions

    cfg = ModelConfig(model_type="llama", vocab_size=40, hidden_size=16, intermediate_size=160,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                      tie_word_embeddings=False)
    return CausalLM(cfg, ModelOptions(scan_layers=scan), rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("scan", [False, True])
def test_quantize_model_quantizes_each_output_channel_of_the_linear_layers_only(scan):
    model = tiny_model(scan=scan)
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    q = quantize_model(model, "int4_g128")
    after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    assert jax.tree.all(jax.tree.map(np.array_equal, before, after))  # the model is unchanged
    layers = [q.layers] if scan else list(q.layers)
    originals = [model.layers] if scan else list(model.layers)
    for layer, orig in zip(layers, originals):
        for parent, oparent in ((layer.self_attn, orig.self_attn), (layer.mlp, orig.mlp)):
            for name in LINEAR:
                if not hasattr(parent, name):
                    continue
                w, w0 = np.asarray(getattr(parent, name)[...]), np.asarray(getattr(oparent, name)[...])
                n_out, ndim = LINEAR[name]
                lead = w0.ndim - ndim
                rows = w0.reshape(*w0.shape[:lead], int(np.prod(w0.shape[lead:lead + n_out])), -1)
                want = rtn_numpy(rows, 4, 128).reshape(w0.shape)
                np.testing.assert_allclose(w, want, rtol=0, atol=2 * np.finfo(np.float32).eps * np.abs(w0).max())
                # an output channel's inputs (here <= 128 except down_proj's 160) share <= 2 grids of 16 levels
                got = w.reshape(rows.shape)
                assert max(len(np.unique(r)) for r in got.reshape(-1, got.shape[-1])) <= 32
                assert not np.array_equal(w, w0)
    for name in ("embed_tokens", "lm_head"):  # embeddings and the output head are not quantized
        assert np.array_equal(np.asarray(getattr(q, name)[...]), np.asarray(getattr(model, name)[...]))
    if scan:
        return
    ids = jnp.asarray([[1, 5, 9, 3]])
    logits = nnx.jit(lambda m: m(ids))
    gap = lambda m: float(np.abs(np.asarray(logits(m)) - np.asarray(logits(model))).max())
    assert gap(q) > 0  # a different model, and int8 is closer to the original than int4
    assert gap(quantize_model(model, "int8")) < gap(quantize_model(model, "int4"))


def test_quantize_model_merges_lora_adapters_first():
    model = add_lora(tiny_model(), rank=2, alpha=4.0, targets=("q_proj",), seed=1)
    for layer in model.layers:  # non-zero B, so the adapters change the weights
        layer.self_attn.q_proj_lora.lora_b[...] = jnp.full_like(layer.self_attn.q_proj_lora.lora_b[...], 0.1)
    from jax_unlearn.models import merge_lora

    merged = merge_lora(model)
    q = quantize_model(model, "int8")
    assert q.layers[0].self_attn.q_proj_lora is None
    w = np.asarray(merged.layers[0].self_attn.q_proj[...])
    want = rtn_numpy(w.reshape(-1, w.shape[-1]), 8, None).reshape(w.shape)
    np.testing.assert_allclose(np.asarray(q.layers[0].self_attn.q_proj[...]), want, rtol=0,
                               atol=2 * np.finfo(np.float32).eps * np.abs(w).max())


def lm_rows(n: int = 8, seq: int = 6, seed: int = 0) -> dict:
    ids = np.random.default_rng(seed).integers(1, 40, size=(n, seq)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()}


def test_relearning_trains_a_copy_deterministically_under_its_seed():
    model = tiny_model()
    w0 = np.asarray(model.layers[0].mlp.up_proj[...])
    attack = Relearner(RelearnConfig(steps=3, lr=1e-2, batch_size=4, seed=0))
    a, b = attack(model, lm_rows()), attack(model, lm_rows())
    assert np.array_equal(np.asarray(model.layers[0].mlp.up_proj[...]), w0)  # the model keeps its weights
    wa, wb = (np.asarray(m.layers[0].mlp.up_proj[...]) for m in (a, b))
    assert np.array_equal(wa, wb) and not np.array_equal(wa, w0)
    assert len(attack._steps) == 1  # one compiled step for both copies
    other = Relearner(RelearnConfig(steps=3, lr=1e-2, batch_size=4, seed=1))(model, lm_rows())
    assert not np.array_equal(np.asarray(other.layers[0].mlp.up_proj[...]), wa)  # control: the seed matters
    ids = jnp.asarray(lm_rows()["input_ids"])  # fine-tuning lowered the NLL of the texts it saw
    nll = nnx.jit(lambda m: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(m(ids)[:, :-1]), ids[:, 1:, None], -1)))
    assert float(nll(a)) < float(nll(model))
    for kwargs, match in (({"steps": 0}, "steps"), ({"batch_size": 1.5}, "batch_size"), ({"lr": 0.0}, "lr"),
                          ({"lr": float("nan")}, "lr")):
        with pytest.raises(ValueError, match=match):
            RelearnConfig(**kwargs)


def test_recovered_fraction():
    assert recovered_fraction(0.5, 0.2, 0.8) == pytest.approx(0.5)
    assert recovered_fraction(0.2, 0.2, 0.8) == 0.0 and recovered_fraction(0.8, 0.2, 0.8) == 1.0
    assert recovered_fraction(0.1, 0.2, 0.8) == pytest.approx(-1 / 6)
    assert recovered_fraction(0.9, 0.8, 0.8) is None  # nothing was forgotten: nothing to recover
    assert recovered_fraction(0.9, 0.8, 0.805, min_gap=0.01) is None
    assert recovered_fraction(0.5, 0.9, 0.8) is None  # unlearning raised accuracy
    assert recovered_fraction(None, 0.2, 0.8) is None


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("robust"))


def test_eval_suite_and_cli_run_every_attack_deterministically(workspace, tmp_path, capsys):
    ws = workspace
    (ws / "para.jsonl").write_text(json.dumps({"question": "Where can spores survive?", "choices": ["soil", "air"],
                                               "answer": 0}) + "\n")
    args = ["eval", "--model", str(ws / "base"), "--mc", str(ws / "mc.jsonl"), "--relearn", str(ws / "forget.jsonl"),
            "--relearn-benign", str(ws / "holdout.jsonl"), "--relearn-steps", "2", "--relearn-lr", "0.05",
            "--relearn-batch-size", "2", "--quantize", "int8", "--quantize", "int4_g128",
            "--paraphrase-mc", str(ws / "para.jsonl")]
    outs = [tmp_path / "a.json", tmp_path / "b.json"]
    for out in outs:
        assert cli.main([*args, "--out", str(out)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    a, b = (json.loads(o.read_text()) for o in outs)
    assert a == b  # every attack is deterministic under its seed
    assert set(a["robustness"]) == {"relearn", "relearn_benign", "int8", "int4_g128", "paraphrase"}
    flat = flatten(a)
    for name in ("mc/mc/accuracy", "relearn/mc/mc/accuracy", "int4_g128/mc/mc/accuracy", "paraphrase/mc/para/accuracy"):
        assert name in flat
    assert "[relearn] MC accuracy" in printed and "[int4_g128] MC accuracy" in printed
    assert "[paraphrase] MC accuracy" in printed


@pytest.mark.parametrize("extra, match", [
    (["--quantize", "int3x"], "int<bits>"),
    (["--relearn-steps", "0"], "--relearn-steps"),
    (["--relearn-lr", "-1"], "--relearn-lr"),
    (["--relearn", "missing.jsonl"], "missing.jsonl does not exist"),
])
def test_eval_attack_errors_exit_2_naming_the_option(workspace, capsys, extra, match):
    args = ["eval", "--model", str(workspace / "base"), "--mc", str(workspace / "mc.jsonl"), *extra]
    with pytest.raises(SystemExit) as exit_:  # argparse's own errors exit 2 too
        code = cli.main(args)
        raise SystemExit(code)
    assert exit_.value.code == 2
    assert match in capsys.readouterr().err
    assert cli.main(["eval", "--model", str(workspace / "base"), "--quantize", "int4"]) == 2
    assert "re-run those metrics" in capsys.readouterr().err


@pytest.mark.parametrize("override, match", [
    ("eval.quantize=[int4_gx]", "'eval.quantize'"),
    ("eval.relearn_steps=0", "'eval.relearn_steps'"),
    ("eval.relearn_lr=0", "'eval.relearn_lr'"),
])
def test_run_config_attack_errors_name_the_key(workspace, override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(str(workspace / "run.yaml"), [f"eval.mc=[{workspace / 'mc.jsonl'}]", override])
    with pytest.raises(ConfigError, match="re-run the eval section's metrics"):
        load_config(str(workspace / "run.yaml"), ["eval.quantize=[int4]"])
    cfg = load_config(str(workspace / "run.yaml"), [f"eval.mc=[{workspace / 'mc.jsonl'}]", "eval.quantize=[int4]",
                                                   f"eval.relearn={workspace / 'forget.jsonl'}"])
    suite = cfg.eval.suite()
    assert suite.quantize == ("int4",) and suite.relearn == str(workspace / "forget.jsonl")
