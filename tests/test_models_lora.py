"""LoRA adapters: identity at start, adapter-only gradients, dropout, parity with peft and
transformers (merged and adapter exports, peft-made adapters), sharding, and bad input."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx
from hf_fixtures import checkpoint, left_pad, rel_err, torch_logits
from jax.sharding import PartitionSpec
from peft import LoraConfig, PeftModel, get_peft_model

from jax_unlearn.models import (
    CheckpointError,
    LoRAConfig,
    add_lora,
    hf_io,
    load_hf,
    lora,
    lora_config,
    merge_lora,
    model_shardings,
    safetensors_io,
    save_hf,
    save_peft,
    without_lora,
)

TOL = 1e-4  # float32 parity with torch, as in test_models_hf_io
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IDS = np.random.RandomState(7).randint(3, 128, size=(2, 20)).astype(np.int32)
PADDED = left_pad([list(IDS[0]), list(IDS[1, :9])])


def _hf_load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def _logits(model, ids_mask=PADDED) -> np.ndarray:
    ids, mask = ids_mask
    return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))


def _close(ours, ref) -> bool:
    """Equal within TOL on the real tokens of the left-padded batch `PADDED`."""
    return rel_err(ours[0], ref[0]) <= TOL and rel_err(ours[1, -9:], ref[1, -9:]) <= TOL


def _randomise(model, seed=1, scale=0.1):
    """Give every ``lora_b`` (and ``lora_a``) random values so the adapters change the output."""
    state = nnx.state(model, nnx.LoRAParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(
        treedef, [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]))
    return model


def _adapter(tmp_path, case="llama_gqa", targets=ALL, name="adapter", **overrides) -> Path:
    src, _ = checkpoint(case, **overrides)
    lm = _randomise(add_lora(load_hf(src), 4, 8, targets))
    return save_peft(lm, tmp_path / name)


def _edit_config(folder: Path, **changes) -> Path:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))
    return folder


# ----------------------------------------------------------------------------- the adapters
@pytest.mark.parametrize("scan", [False, True])
def test_add_lora_starts_as_the_base_model_and_holds_only_adapters_as_lora_params(scan):
    assert issubclass(nnx.LoRAParam, nnx.Param)
    src, _ = checkpoint("llama_gqa")
    model = load_hf(src, scan_layers=scan)
    lm = add_lora(model, rank=8, alpha=16, targets="all-linear")
    np.testing.assert_array_equal(_logits(lm), _logits(model))  # B = 0: exactly the base model
    assert lora_config(model) is None and lora_config(lm) == LoRAConfig(8, 16, ALL, 0.0)
    assert lm.embed_tokens[...] is model.embed_tokens[...]  # base weights shared, not copied
    layer, base_layer = (lm.layers, model.layers) if scan else (lm.layers[1], model.layers[1])
    assert layer.mlp.down_proj[...] is base_layer.mlp.down_proj[...]
    lead = (2,) if scan else ()
    shapes = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
              "gate_proj": (64, 96), "up_proj": (64, 96), "down_proj": (96, 64)}  # (in, out)
    flat = dict(nnx.to_flat_state(nnx.state(lm, nnx.LoRAParam)))
    assert len(flat) == 2 * 7 * (1 if scan else 2)
    assert all(isinstance(v, nnx.LoRAParam) for v in flat.values())
    assert len(nnx.to_flat_state(nnx.state(lm, nnx.Param))) == len(flat) + len(
        nnx.to_flat_state(nnx.state(model, nnx.Param)))  # the base parameters are unchanged in number
    for target, (fin, fout) in shapes.items():
        ad = getattr(getattr(layer, lora.TARGETS[target][0]), f"{target}_lora")
        a, b = np.asarray(ad.lora_a[...]), np.asarray(ad.lora_b[...])
        assert a.shape == lead + (fin, 8) and b.shape == lead + (8, fout)
        assert a.dtype == b.dtype == np.float32 and not b.any()
        # peft's kaiming_uniform(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)), std 1/sqrt(3 in)
        assert np.abs(a).max() <= 1 / np.sqrt(fin) and abs(a.std() * np.sqrt(3 * fin) - 1) < 0.15
        assert ad.lora_a.get_metadata()["out_sharding"][-2:] == (lora.TARGETS[target][1], "lora_rank")
        assert ad.lora_b.get_metadata()["out_sharding"][-2:] == ("lora_rank", lora.TARGETS[target][2])


def test_scanned_and_unscanned_models_get_the_same_adapters():
    src, _ = checkpoint("mistral_window")
    flat = add_lora(load_hf(src), 4, 8, ALL, seed=5)
    stacked = add_lora(load_hf(src, scan_layers=True), 4, 8, ALL, seed=5)
    other_seed = add_lora(load_hf(src), 4, 8, ALL, seed=6)
    for i in range(2):
        np.testing.assert_array_equal(stacked.layers.mlp.up_proj_lora.lora_a[...][i],
                                      flat.layers[i].mlp.up_proj_lora.lora_a[...])
    assert not np.allclose(flat.layers[0].mlp.up_proj_lora.lora_a[...], other_seed.layers[0].mlp.up_proj_lora.lora_a[...])
    # A depends on the target, not on which other targets were chosen
    only_q = add_lora(load_hf(src), 4, 8, ("q_proj",), seed=5)
    np.testing.assert_array_equal(only_q.layers[1].self_attn.q_proj_lora.lora_a[...],
                                  flat.layers[1].self_attn.q_proj_lora.lora_a[...])


@pytest.mark.parametrize("scan", [False, True])
def test_only_adapters_are_differentiated_and_trained(scan):
    src, _ = checkpoint("llama_gqa")
    model = load_hf(src, scan_layers=scan)
    lm = add_lora(model, 4, 8, ("q_proj", "v_proj", "down_proj"))
    graphdef, adapters, rest = nnx.split(lm, nnx.LoRAParam, ...)
    ids = jnp.asarray(IDS)

    def loss(adapters):
        logits = nnx.merge(graphdef, adapters, rest)(ids[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))

    grads = jax.grad(loss)(adapters)
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)
    n_adapter = sum(x.size for x in jax.tree.leaves(adapters))
    assert n_adapter == 2 * 4 * (64 + 64 + 64 + 32 + 96 + 64)
    flat = nnx.to_flat_state(grads)
    for path, g in flat:  # with B = 0 only B gets a gradient at the start, as in peft
        assert (np.abs(np.asarray(g[...])).max() > 0) == (path[-1] == "lora_b"), path
    tx = optax.adam(1e-2)
    opt_state = tx.init(adapters)
    assert sum(x.size for x in jax.tree.leaves(opt_state)) == 2 * n_adapter + 1  # mu, nu, count
    updates, _ = tx.update(grads, opt_state, adapters)
    trained = nnx.merge(graphdef, optax.apply_updates(adapters, updates), rest)
    assert loss(nnx.state(trained, nnx.LoRAParam)) < loss(adapters)
    np.testing.assert_array_equal(_logits(without_lora(trained)), _logits(model))  # base untouched


def test_merge_lora_and_without_lora():
    src, _ = checkpoint("llama_gqa")
    model = load_hf(src)
    lm = _randomise(add_lora(model, 4, 12, ALL))
    ours = _logits(lm)
    assert rel_err(ours, _logits(model)) > 0.05  # the adapters matter
    merged = merge_lora(lm)
    assert lora_config(merged) is None and not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
    assert rel_err(_logits(merged), ours) < 1e-5
    ad = lm.layers[0].self_attn.o_proj_lora  # o_proj: weight [D, N, H], input heads flattened
    delta = 3.0 * (np.asarray(ad.lora_a[...], np.float64) @ np.asarray(ad.lora_b[...], np.float64)).T
    want = np.asarray(model.layers[0].self_attn.o_proj[...], np.float64) + delta.reshape(64, 4, 16)
    np.testing.assert_allclose(merged.layers[0].self_attn.o_proj[...], want, rtol=1e-6, atol=1e-7)
    assert merged.layers[0].mlp.up_bias[...] is model.layers[0].mlp.up_bias[...]
    # lm itself is unchanged; without_lora is the base model on the same arrays
    assert lora_config(lm) is not None and lm.layers[0].self_attn.o_proj[...] is model.layers[0].self_attn.o_proj[...]
    base = without_lora(lm)
    assert lora_config(base) is None and base.layers[0].self_attn.q_proj[...] is model.layers[0].self_attn.q_proj[...]
    np.testing.assert_array_equal(_logits(base), _logits(model))
    # bfloat16 weights: merged in float32, stored in the weight's dtype
    lm16 = _randomise(add_lora(load_hf(src, dtype=jnp.bfloat16), 4, 12, ("q_proj",)))
    q16 = merge_lora(lm16).layers[1].self_attn.q_proj[...]
    ad16 = lm16.layers[1].self_attn.q_proj_lora
    exact = (np.asarray(lm16.layers[1].self_attn.q_proj[...], np.float32)
             + 3.0 * (np.asarray(ad16.lora_a[...]) @ np.asarray(ad16.lora_b[...])).T.reshape(4, 16, 64))
    assert q16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(q16, np.float32), exact, rtol=2**-8, atol=1e-6)


@pytest.mark.parametrize("scan", [False, True])
def test_dropout_acts_only_in_train_mode(scan):
    src, _ = checkpoint("mistral_window")
    lm = _randomise(add_lora(load_hf(src, scan_layers=scan), 4, 8, ALL, dropout=0.5, seed=2))
    ref = _logits(lm)  # eval (deterministic) by default
    np.testing.assert_array_equal(_logits(lm), ref)
    lm.train()
    first, second = _logits(lm), _logits(lm)
    assert rel_err(first, ref) > 1e-3 and rel_err(second, first) > 1e-3  # fresh masks each call
    call = nnx.jit(lambda m, ids, mask: m(ids, mask))
    a, b = (np.asarray(call(lm, *map(jnp.asarray, PADDED))) for _ in range(2))
    assert rel_err(a, b) > 1e-3  # the RNG counters advance through a jitted call too
    np.testing.assert_array_equal(_logits(merge_lora(lm)), _logits(merge_lora(lm)))  # merged: no dropout
    assert rel_err(_logits(merge_lora(lm)), ref) < 1e-5
    lm.eval()
    np.testing.assert_array_equal(_logits(lm), ref)


def test_dropout_masks_do_not_depend_on_layer_layout_or_remat():
    src, _ = checkpoint("llama_gqa")
    outs = []
    for options in ({}, {"scan_layers": True}, {"remat_policy": "full"}, {"scan_layers": True, "remat_policy": "full"}):
        lm = add_lora(load_hf(src, **options), 4, 8, ALL, dropout=0.3, seed=3)
        for _, _, _, ad in lora._adapted(lm):
            ad.lora_b.set_value(jnp.full(ad.lora_b.shape, 0.05))
        lm.train()
        run = [_logits(lm), _logits(lm)]
        lm.hidden_at(jnp.asarray(IDS), None, 0)  # runs (and draws masks for) layer 0 only
        outs.append(run + [_logits(lm)])
    for run in outs[1:]:
        for got, want in zip(run, outs[0]):
            assert rel_err(got, want) < 1e-6


# ----------------------------------------------------------------------------- parity with peft
@pytest.mark.parametrize("case,scan,targets", [
    ("llama_gqa", False, ALL),
    ("llama_gqa", True, ("q_proj", "v_proj")),
    ("mistral_window", False, ("k_proj", "o_proj", "up_proj")),
    ("mistral_window", True, ALL),
    ("mqa_tied", True, ("v_proj", "gate_proj", "down_proj")),
])
def test_exports_load_in_peft_and_transformers_with_equal_logits(case, scan, targets, tmp_path):
    src, hf_src = checkpoint(case)
    model = load_hf(src, scan_layers=scan)
    lm = _randomise(add_lora(model, 4, 8, targets, dropout=0.05))
    ours = _logits(lm)
    assert rel_err(ours, _logits(model)) > 0.05  # the adapters matter

    adapter = save_peft(lm, tmp_path / "adapter", base_model_name_or_path=str(src))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (
        "LORA", "CAUSAL_LM", 4, 8, 0.05)
    assert cfg["target_modules"] == list(targets) and cfg["base_model_name_or_path"] == str(src)
    peft_model = PeftModel.from_pretrained(_hf_load(src), adapter).eval()
    assert _close(ours, torch_logits(peft_model, *PADDED))

    merged = save_hf(lm, tmp_path / "merged")
    assert sorted(p.name for p in merged.iterdir()) == ["config.json", "model.safetensors"]
    assert _close(ours, torch_logits(_hf_load(merged), *PADDED))
    assert rel_err(torch_logits(hf_src, *PADDED), _logits(model)) <= TOL  # the base is still the base

    np.testing.assert_array_equal(_logits(load_hf(src, scan_layers=scan, peft=adapter)), ours)
    other_layout = load_hf(src, scan_layers=not scan, peft=adapter)
    assert lora_config(other_layout) == lora_config(lm) and rel_err(_logits(other_layout), ours) < 1e-5


@pytest.mark.parametrize("case,targets,scan", [
    ("llama_gqa", ["q_proj", "v_proj"], False),
    ("mistral_window", "all-linear", True),
])
def test_peft_made_adapter_loads_with_equal_logits(case, targets, scan, tmp_path):
    src, _ = checkpoint(case)
    torch.manual_seed(3)
    peft_model = get_peft_model(_hf_load(src), LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1,
                                                          target_modules=targets, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn_like(p))
    peft_model.eval().save_pretrained(tmp_path / "adapter")
    ours = load_hf(src, scan_layers=scan, peft=tmp_path / "adapter")
    want = ALL if targets == "all-linear" else tuple(targets)
    assert lora_config(ours) == LoRAConfig(4, 16, want, 0.1)
    assert _close(_logits(ours), torch_logits(peft_model, *PADDED))
    # and back: our export of it loads in peft with the same logits
    again = PeftModel.from_pretrained(_hf_load(src), save_peft(ours, tmp_path / "ours")).eval()
    assert rel_err(torch_logits(again, *PADDED), torch_logits(peft_model, *PADDED)) < 1e-6


# ----------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("scan", [False, True])
def test_lora_model_shards_on_8_devices_with_equal_logits(scan, tmp_path):
    assert len(jax.devices()) == 8
    mesh = jax.make_mesh((1, 2, 4), ("data", "fsdp", "tensor"))
    src, _ = checkpoint("llama_gqa")
    plain = _randomise(add_lora(load_hf(src, scan_layers=scan), 4, 8, ALL))
    adapter = save_peft(plain, tmp_path / "adapter")
    sharded = load_hf(src, shardings=mesh, scan_layers=scan, peft=adapter)
    lead = (None,) if scan else ()
    layer = sharded.layers if scan else sharded.layers[0]
    specs = {  # (lora_a [in, r], lora_b [r, out]); rank replicated, other axis like the base weight's
        "q_proj": (("fsdp", None), (None, "tensor")), "o_proj": (("tensor", None), (None, "fsdp")),
        "k_proj": (("fsdp", None), (None, "tensor")), "down_proj": (("tensor", None), (None, "fsdp")),
        "gate_proj": (("fsdp", None), (None, "tensor")),
    }
    for target, (spec_a, spec_b) in specs.items():
        ad = getattr(getattr(layer, lora.TARGETS[target][0]), f"{target}_lora")
        assert ad.lora_a[...].sharding.spec == PartitionSpec(*lead, *spec_a), target
        assert ad.lora_b[...].sharding.spec == PartitionSpec(*lead, *spec_b), target
        assert len(ad.lora_a[...].devices()) == 8
    shard = layer.self_attn.q_proj_lora.lora_a[...].addressable_shards[0].data
    assert shard.shape == ((2,) if scan else ()) + (32, 4)  # embed split 2 ways, rank whole
    want = model_shardings(plain, mesh)  # the same placement from the logical axes
    got = jax.tree.map(lambda a: a.sharding, nnx.state(sharded))
    assert jax.tree.leaves(want) == jax.tree.leaves(got)
    ids, mask = map(jnp.asarray, PADDED)
    np.testing.assert_allclose(jax.jit(lambda m: m(ids, mask))(sharded), _logits(plain), rtol=1e-5, atol=1e-5)
    # adapters added to a sharded model are placed too, and merging keeps the base placement
    fresh = add_lora(load_hf(src, shardings=mesh, scan_layers=scan), 4, 8, ("o_proj",), shardings=mesh)
    fresh_layer = fresh.layers if scan else fresh.layers[0]
    assert fresh_layer.self_attn.o_proj_lora.lora_b[...].sharding.spec == PartitionSpec(*lead, None, "fsdp")
    merged = merge_lora(sharded)
    q = (merged.layers if scan else merged.layers[0]).self_attn.q_proj[...]
    assert q.sharding.spec == PartitionSpec(*lead, "tensor", None, "fsdp")
    np.testing.assert_allclose(jax.jit(lambda m: m(ids, mask))(merged), _logits(plain), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- bad input
def test_add_lora_rejects_bad_arguments():
    src, _ = checkpoint("llama_gqa")
    model = load_hf(src)
    for rank in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=rf"LoRA rank must be a positive integer, got {rank!r}"):
            add_lora(model, rank, 8)
    with pytest.raises(ValueError, match="LoRA alpha must be a positive finite number, got 0"):
        add_lora(model, 4, 0)
    with pytest.raises(ValueError, match=r"LoRA dropout must be a probability in \[0, 1\), got 1.0"):
        add_lora(model, 4, 8, dropout=1.0)
    with pytest.raises(ValueError, match=r"unknown target module\(s\) 'qproj', 'wq'; supported: q_proj, k_proj"):
        add_lora(model, 4, 8, ("q_proj", "qproj", "wq"))
    with pytest.raises(ValueError, match="'lm_head' is not supported as a LoRA target"):
        add_lora(model, 4, 8, ("q_proj", "lm_head"))
    with pytest.raises(ValueError, match="targets is empty"):
        add_lora(model, 4, 8, ())
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_lora(add_lora(model, 4, 8), 4, 8)
    with pytest.raises(ValueError, match="has no LoRA adapters to save"):
        save_peft(model, "unused")


def test_adapter_of_another_base_model_is_refused(tmp_path):
    src, _ = checkpoint("llama_gqa")
    deeper = _adapter(tmp_path, num_hidden_layers=3, name="deeper")
    with pytest.raises(CheckpointError, match="the adapter was made for a different base model: "
                                              "num_hidden_layers 3 \\(base model: 2\\)"):
        load_hf(src, peft=deeper)
    # without our metadata (as peft writes it) the tensors themselves give it away
    meta_free = _strip_metadata(deeper)
    with pytest.raises(CheckpointError, match=r"tensor base_model\.model\.model\.layers\.2\.\w+\.\w+\.lora_[AB]\.weight adapts layer 2, "
                                              r"but the base model has 2 layers"):
        load_hf(src, peft=meta_free)
    wider = _strip_metadata(_adapter(tmp_path, intermediate_size=80, name="wider"))
    with pytest.raises(CheckpointError, match=r"tensor base_model\.model\.model\.layers\.0\.mlp\.gate_proj\.lora_B"
                                              r"\.weight in adapter_model\.safetensors has shape \(80, 4\), "
                                              r"expected \(96, 4\).*intermediate_size=96"):
        load_hf(src, peft=wider)
    rope = _adapter(tmp_path, name="rope", rope_parameters=dict(rope_type="default", rope_theta=500000.0))
    with pytest.raises(CheckpointError, match=r"different base model: rope_theta 500000\.0 \(base model: 10000\.0\)"):
        load_hf(src, peft=rope)
    mistral = _adapter(tmp_path, case="mistral_window", name="mistral")
    with pytest.raises(CheckpointError, match="model_type 'mistral' \\(base model: 'llama'\\)"):
        load_hf(src, peft=mistral)


def _strip_metadata(folder: Path) -> Path:
    from safetensors.numpy import load_file, save_file

    f = folder / "adapter_model.safetensors"
    save_file(load_file(f), str(f), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("changes,message", [
    ({"r": 0}, "field 'r' must be a positive integer, got 0"),
    ({"r": -4}, "field 'r' must be a positive integer, got -4"),
    ({"r": 8}, r"lora_A\.weight in adapter_model\.safetensors has shape \(4, 64\), expected \(8, 64\)"),
    ({"peft_type": "IA3"}, "field 'peft_type' is 'IA3'; only 'LORA' is supported"),
    ({"task_type": "SEQ_CLS"}, "field 'task_type' is 'SEQ_CLS'; expected 'CAUSAL_LM'"),
    ({"use_dora": True}, "unsupported option\\(s\\) use_dora=True"),
    ({"bias": "all"}, "unsupported option\\(s\\) bias='all'"),
    ({"layers_to_transform": [0]}, "unsupported option\\(s\\) layers_to_transform=\\[0\\]"),
    ({"target_modules": ".*proj"}, "field 'target_modules' is the pattern '.\\*proj'"),
    ({"target_modules": ["q_proj", "qkv_proj"]}, "unknown target module\\(s\\) 'qkv_proj'"),
    ({"target_modules": ["q_proj", "lm_head"]}, "'lm_head' is not supported as a LoRA target"),
    ({"target_modules": ["q_proj"]}, r"layers\.0\.self_attn\.v_proj\.lora_A\.weight adapts v_proj, which "
                                     r"adapter_config\.json field 'target_modules' \['q_proj'\] does not list"),
    ({"target_modules": ["q_proj", "k_proj", "v_proj"]},
     r"missing tensor\(s\) base_model\.model\.model\.layers\.0\.self_attn\.k_proj\.lora_A\.weight \(expected shape \(4, 64\)\)"),
])
def test_bad_adapter_config_is_refused_before_reading_tensors(changes, message, tmp_path, monkeypatch):
    src, _ = checkpoint("llama_gqa")
    folder = _edit_config(_adapter(tmp_path, targets=("q_proj", "v_proj")), **changes)

    def no_reads(*args):
        raise AssertionError("a tensor was read before the adapter was validated")

    monkeypatch.setattr(safetensors_io, "read_into", no_reads)
    with pytest.raises(CheckpointError, match=message):
        load_hf(src, peft=folder)
    with pytest.raises(CheckpointError, match=message):  # also onto an already-loaded base model
        lora.load_peft(_abstract(src), folder)


def _abstract(src):
    """A base model without reading any tensor (``load_peft`` must fail before touching it)."""
    config = hf_io.ModelConfig.from_json_file(src)
    return nnx.eval_shape(lambda: hf_io.CausalLM(config, rngs=nnx.Rngs(0)))


def test_missing_or_pickle_adapter_folders(tmp_path):
    src, _ = checkpoint("llama_gqa")
    with pytest.raises(FileNotFoundError, match="adapter folder .*nowhere does not exist"):
        load_hf(src, peft=tmp_path / "nowhere")
    folder = _adapter(tmp_path)
    with pytest.raises(FileExistsError, match="adapter folder .* is not empty"):
        save_peft(_randomise(add_lora(load_hf(src), 4, 8)), folder)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="holds only a pickle adapter \\(adapter_model.bin\\)"):
        load_hf(src, peft=folder)
    (folder / "adapter_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="has no adapter_model.safetensors"):
        load_hf(src, peft=folder)
    shutil.rmtree(folder)
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        load_hf(src, peft=folder)
