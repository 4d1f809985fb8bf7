"""Logits and hidden states of our Flax decoder vs transformers (PyTorch, CPU, float32)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_fixtures import CASES, checkpoint, left_pad, rel_err, torch_hidden, torch_logits

from jax_unlearn.models import CausalLM, load_hf

TOL = 1e-4
SEQ = 24  # longer than the Mistral window (5) and the llama3 original context (16)


def _ids(seed=0, batch=2, seq=SEQ):
    return np.random.RandomState(seed).randint(3, 128, size=(batch, seq)).astype(np.int32)


def _with_config(model: CausalLM, cfg) -> CausalLM:
    """The same parameters under another (shape-compatible) config."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, model.options, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.state(model))


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case):
    path, hf = checkpoint(case)
    model = load_hf(path)
    ids = _ids()
    logits = model(jnp.asarray(ids))
    assert logits.shape == (2, SEQ, 128) and logits.dtype == jnp.float32
    assert rel_err(logits, torch_logits(hf, ids)) <= TOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_left_padded_batch_matches_unpadded_rows(case):
    path, hf = checkpoint(case)
    model = load_hf(path)
    full = _ids(1, batch=3)
    lengths = [SEQ, 9, 17]
    ids, mask = left_pad([list(full[i, :n]) for i, n in enumerate(lengths)])
    logits = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    ref_padded = torch_logits(hf, ids, mask)
    for i, n in enumerate(lengths):
        alone = torch_logits(hf, full[i:i + 1, :n])[0]
        assert rel_err(logits[i, SEQ - n:], alone) <= TOL
        assert rel_err(logits[i, SEQ - n:], ref_padded[i, SEQ - n:]) <= TOL


def test_right_padded_rows_match_unpadded_rows():
    path, hf = checkpoint("mistral_window")
    model = load_hf(path)
    full = _ids(5)
    ids, mask = full.copy(), np.ones_like(full)
    ids[1, 11:], mask[1, 11:] = 0, 0
    logits = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    assert rel_err(logits[0], torch_logits(hf, full[:1])[0]) <= TOL
    assert rel_err(logits[1, :11], torch_logits(hf, full[1:2, :11])[0]) <= TOL


@pytest.mark.parametrize("case,change", [
    ("llama3_rope", dict(rope_scaling=None)),
    ("linear_rope", dict(rope_scaling=None)),
    ("mistral_window", dict(sliding_window=None)),
])
def test_parity_tests_are_sensitive_to_the_feature(case, change):
    """Dropping rope scaling or the window breaks parity, so the tests above really check them."""
    path, hf = checkpoint(case)
    model = load_hf(path)
    wrong = _with_config(model, dataclasses.replace(model.config, **change))
    assert rel_err(wrong(jnp.asarray(_ids())), torch_logits(hf, _ids())) > 100 * TOL


def test_hidden_states_match_transformers():
    path, hf = checkpoint("llama_gqa", num_hidden_layers=3)
    model = load_hf(path)
    ids = _ids(2)
    mask = jnp.ones(ids.shape, jnp.int32)
    for layer in range(3):
        h = model.hidden_at(jnp.asarray(ids), mask, layer)
        logits, h2 = model(jnp.asarray(ids), mask, return_hidden_at=layer)
        np.testing.assert_array_equal(np.asarray(h), np.asarray(h2))
        ref = torch_hidden(hf, ids, layer)
        if layer == 2:  # HF's last hidden state is taken after the final norm
            h = model.norm(h)
        assert rel_err(h, ref) <= TOL
    assert rel_err(logits, torch_logits(hf, ids)) <= TOL
    with pytest.raises(ValueError, match=r"return_hidden_at=3 outside \[0, 3\)"):
        model(jnp.asarray(ids), return_hidden_at=3)
    with pytest.raises(ValueError, match=r"layer=-1 outside"):
        model.hidden_at(jnp.asarray(ids), None, -1)


def _loss(model, ids, mask):
    logits = model(ids, mask)
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 0] * mask)


@pytest.mark.parametrize("options", [
    dict(scan_layers=True),
    dict(remat_policy="full"),
    dict(scan_layers=True, remat_policy="dots_with_no_batch_dims_saveable"),
])
def test_scan_and_remat_equal_plain_model(options):
    path, _ = checkpoint("mistral_window", num_hidden_layers=3)
    plain, other = load_hf(path), load_hf(path, **options)
    ids, mask = left_pad([list(_ids(3)[0]), list(_ids(3)[1, :11])])
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    np.testing.assert_allclose(other(ids, mask), plain(ids, mask), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(other.hidden_at(ids, mask, 1), plain.hidden_at(ids, mask, 1), rtol=1e-5, atol=1e-5)
    g_plain = nnx.grad(_loss)(plain, ids, mask)
    g_other = nnx.grad(_loss)(other, ids, mask)
    np.testing.assert_allclose(g_other["embed_tokens"][...], g_plain["embed_tokens"][...], rtol=1e-4, atol=1e-7)
    for i in range(3):
        a = g_other["layers"]["mlp"]["down_proj"][...][i] if options.get("scan_layers") else \
            g_other["layers"][i]["mlp"]["down_proj"][...]
        np.testing.assert_allclose(a, g_plain["layers"][i]["mlp"]["down_proj"][...], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("scan", [False, True])
def test_without_remat_the_backward_keeps_two_mlp_activations_per_layer_and_no_norm_statistics(scan, monkeypatch):
    """Without a remat policy the MLP's element-wise part (silu, product) and the RMS norm's
    float32 statistics are recomputed in the backward (`llama._recomputed`): per layer the
    backward keeps the two projections ``g, u [b, t, F]`` and no ``[b, t, 1]`` norm statistics.
    Control: without the recomputation autodiff keeps more of both."""
    from jax._src.ad_checkpoint import saved_residuals

    from jax_unlearn.models import ModelConfig, ModelOptions, llama

    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64)
    ids = jnp.zeros((2, 5), jnp.int32)

    def kept():
        graphdef, state = nnx.split(CausalLM(cfg, ModelOptions(scan_layers=scan), rngs=nnx.Rngs(0)))
        res = [aval.shape for aval, _ in saved_residuals(lambda s: nnx.merge(graphdef, s)(ids).sum(), state)
               if jnp.issubdtype(aval.dtype, jnp.floating)]
        per_layer = [shape[1:] if scan else shape for shape in res if len(shape) == (4 if scan else 3)]
        return per_layer.count((2, 5, cfg.intermediate_size)), per_layer.count((2, 5, 1))

    layers = 1 if scan else cfg.num_hidden_layers  # a scan keeps one stacked residual for all layers
    assert kept() == (2 * layers, 0)
    monkeypatch.setattr(llama, "_recomputed", lambda f, on, **kwargs: f)
    mlp, stats = kept()
    assert mlp >= 4 * layers and stats >= 2 * layers


def test_scan_compiles_one_layer_body():
    """With scan_layers the jaxpr holds one layer body whatever the depth."""
    path2, _ = checkpoint("llama_gqa", num_hidden_layers=2)
    path4, _ = checkpoint("llama_gqa", num_hidden_layers=4)
    ids = jnp.zeros((1, 8), jnp.int32)

    def n_eqns(path, scan):
        model = load_hf(path, scan_layers=scan)
        graphdef, state = nnx.split(model)
        jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(ids))(state)
        return len(str(jaxpr).splitlines())

    assert n_eqns(path2, True) == n_eqns(path4, True)
    assert n_eqns(path4, False) > n_eqns(path2, False)


def test_bfloat16_checkpoint_and_dtypes():
    path, hf = checkpoint("llama_gqa", dtype=torch.bfloat16)
    ids = _ids(4)
    ref = torch_logits(hf, ids)  # hf holds the bf16-rounded weights in float32
    m32 = load_hf(path)  # bf16 file cast up to float32: exact weights
    assert m32.embed_tokens[...].dtype == jnp.float32
    assert rel_err(m32(jnp.asarray(ids)), ref) <= TOL
    m16 = load_hf(path, dtype=jnp.bfloat16)
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(nnx.state(m16)))
    out = m16(jnp.asarray(ids))
    assert out.dtype == jnp.float32 and rel_err(out, ref) < 5e-2
    mixed = load_hf(path, compute_dtype=jnp.bfloat16)  # float32 params, bf16 activations
    out = mixed(jnp.asarray(ids))
    assert out.dtype == jnp.float32 and 0 < rel_err(out, ref) < 5e-2


def test_parameters_carry_logical_axis_names():
    path, _ = checkpoint("llama_gqa")
    specs = nnx.get_partition_spec(nnx.state(load_hf(path)))
    assert tuple(specs["embed_tokens"].get_value()) == ("vocab", "embed")
    assert tuple(specs["layers"][0]["self_attn"]["q_proj"].get_value()) == ("heads", "head_dim", "embed")
    assert tuple(specs["layers"][0]["self_attn"]["k_proj"].get_value()) == ("kv_heads", "head_dim", "embed")
    assert tuple(specs["layers"][0]["mlp"]["down_proj"].get_value()) == ("embed", "mlp")
    scanned = nnx.get_partition_spec(nnx.state(load_hf(path, scan_layers=True)))
    assert tuple(scanned["layers"]["self_attn"]["o_proj"].get_value()) == ("layers", "embed", "heads", "head_dim")


def test_attention_implementation_option():
    path, hf = checkpoint("mistral_window")
    ids, mask = left_pad([list(_ids(6)[0]), list(_ids(6)[1, :10])])
    xla = load_hf(path, attention_impl="xla")
    assert xla.options.attention_impl == "xla"
    np.testing.assert_allclose(xla(jnp.asarray(ids), jnp.asarray(mask)),
                               load_hf(path)(jnp.asarray(ids), jnp.asarray(mask)), rtol=1e-6, atol=1e-6)
    assert rel_err(xla(jnp.asarray(_ids())), torch_logits(hf, _ids())) <= TOL
