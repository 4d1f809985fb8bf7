"""load_hf / save_hf: round trips through transformers, sharding, and malformed checkpoints."""

import json
import pickle
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hf_fixtures import checkpoint, left_pad, rel_err, torch_logits
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from jax_unlearn.models import CheckpointError, hf_io, load_hf, model_shardings, safetensors_io, save_hf

TOL = 1e-4
IDS = np.random.RandomState(7).randint(3, 128, size=(2, 20)).astype(np.int32)


def _hf_load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def _copy(case, tmp_path, **kw) -> Path:
    src, _ = checkpoint(case, **kw)
    return Path(shutil.copytree(src, tmp_path / "ckpt"))


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("case,options", [
    ("llama3_rope", {}),
    ("mqa_tied", {}),
    ("mistral_window", {"scan_layers": True}),
])
def test_save_hf_loads_in_transformers_with_equal_logits(case, options, tmp_path):
    src, hf_src = checkpoint(case)
    model = load_hf(src, **options)
    out = save_hf(model, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    with safe_open(out / "model.safetensors", framework="numpy") as f:
        assert ("lm_head.weight" in f.keys()) == (not model.config.tie_word_embeddings)
        assert f.metadata()["format"] == "pt"
    hf = _hf_load(out)
    assert type(hf).__name__ == type(hf_src).__name__
    assert hf.config.rope_parameters == hf_src.config.rope_parameters
    ids, mask = left_pad([list(IDS[0]), list(IDS[1, :9])])
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    ref = torch_logits(hf, ids, mask)
    assert rel_err(ours[0], ref[0]) <= TOL and rel_err(ours[1, -9:], ref[1, -9:]) <= TOL
    assert rel_err(ref, torch_logits(hf_src, ids, mask)) < 1e-6  # same weights as the source
    np.testing.assert_array_equal(load_hf(out)(jnp.asarray(IDS)), load_hf(src)(jnp.asarray(IDS)))


def test_sharded_save_writes_index_and_round_trips(tmp_path):
    src, _ = checkpoint("llama_gqa")
    model = load_hf(src)
    out = save_hf(model, tmp_path / "export", max_shard_size="60KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == shards
    sizes = {s: (out / s).stat().st_size for s in shards}
    assert max(sizes.values()) < 60_000 + 4096  # each shard stays near the limit (+ header)
    assert index["metadata"]["total_size"] == sum(
        4 * int(np.prod(s)) for s in hf_io.hf_tensor_shapes(model.config).values())
    np.testing.assert_array_equal(load_hf(out)(jnp.asarray(IDS)), model(jnp.asarray(IDS)))
    assert rel_err(torch_logits(_hf_load(out), IDS), np.asarray(model(jnp.asarray(IDS)))) <= TOL


def test_loads_transformers_sharded_checkpoint():
    path, hf = checkpoint("llama_gqa", max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").is_file() and not (path / "model.safetensors").exists()
    assert rel_err(load_hf(path)(jnp.asarray(IDS)), torch_logits(hf, IDS)) <= TOL


def test_save_bfloat16_model(tmp_path):
    src, _ = checkpoint("llama_gqa")
    model = load_hf(src, dtype=jnp.bfloat16)
    out = save_hf(model, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", framework="numpy") as f:
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight").get_dtype() == "BF16"
    hf = _hf_load(out)
    assert hf.dtype == torch.bfloat16
    back = load_hf(out, dtype=jnp.bfloat16)
    for a, b in zip(jax.tree.leaves(nnx.state(back)), jax.tree.leaves(nnx.state(model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_save_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", "hello", "world", "forget"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                                  bos_token="<s>", eos_token="</s>")
    src, _ = checkpoint("mqa_tied")
    out = save_hf(load_hf(src), tmp_path / "with_tok", tokenizer=hf_tok)
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    again = transformers.AutoTokenizer.from_pretrained(out)
    assert again("hello world forget")["input_ids"] == [4, 5, 6]
    assert again.pad_token == "<pad>"


def test_save_refuses_non_empty_folder_unless_overwrite(tmp_path):
    src, _ = checkpoint("mqa_tied")
    model = load_hf(src)
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"not empty; pass overwrite=True"):
        save_hf(model, target)
    assert (target / "notes.txt").read_text() == "keep me"
    save_hf(model, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or backup folders left
    empty = tmp_path / "empty"
    empty.mkdir()
    save_hf(model, empty)  # an empty folder is fine
    assert (empty / "config.json").is_file()


def test_failed_save_keeps_existing_output(tmp_path, monkeypatch):
    src, _ = checkpoint("llama_gqa")
    model = load_hf(src)
    target = save_hf(model, tmp_path / "out", max_shard_size="60KB")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    calls = []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors_io, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_hf(model, target, overwrite=True, max_shard_size="60KB")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ----------------------------------------------------------------------------- sharding
def test_load_with_shardings_on_8_devices_equals_unsharded():
    assert jax.device_count() == 8
    path, _ = checkpoint("llama_gqa")
    plain = load_hf(path)
    mesh = jax.make_mesh((1, 2, 4), ("data", "fsdp", "tensor"))
    sharded = load_hf(path, shardings=mesh)
    q = sharded.layers[0].self_attn.q_proj[...]
    assert q.sharding.spec == PartitionSpec("tensor", None, "fsdp")
    assert q.sharding.mesh.devices.tolist() == mesh.devices.tolist()
    assert q.addressable_shards[0].data.shape == (1, 16, 32)  # really split 4 x 2 ways
    emb = sharded.embed_tokens[...]
    assert emb.sharding.spec == PartitionSpec("tensor", "fsdp") and len(emb.devices()) == 8
    # 2 kv heads cannot be split over tensor=4: that dimension is replicated, embed still fsdp
    assert sharded.layers[0].self_attn.k_proj[...].sharding.spec == PartitionSpec(None, None, "fsdp")
    ids, mask = left_pad([list(IDS[0]), list(IDS[1, :12])])
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    np.testing.assert_allclose(jax.jit(lambda m: m(ids, mask))(sharded), plain(ids, mask), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(nnx.state(sharded)), jax.tree.leaves(nnx.state(plain))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # model_shardings derives the same placement from the logical axes (e.g. for jit out_shardings)
    want = model_shardings(plain, mesh)
    got = jax.tree.map(lambda a: a.sharding, nnx.state(sharded))
    assert jax.tree.leaves(want) == jax.tree.leaves(got)


def test_shardings_with_rules_callable_and_scan():
    path, _ = checkpoint("llama_gqa")
    plain = load_hf(path)
    mesh = jax.make_mesh((2, 4), ("data", "tensor"))
    rules = {"mlp": "tensor", "vocab": "data"}
    m = load_hf(path, shardings=(mesh, rules), scan_layers=True)
    assert m.layers.mlp.up_proj[...].sharding.spec == PartitionSpec(None, "tensor", None)
    assert m.embed_tokens[...].sharding.spec == PartitionSpec("data", None)
    seen = []
    auto = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)

    def place(name, shape, axes):
        seen.append((name, shape, axes))
        return NamedSharding(auto, PartitionSpec("data") if shape[0] % 2 == 0 else PartitionSpec())

    m2 = load_hf(path, shardings=place)
    assert ("layers.1.self_attn.o_proj", (64, 4, 16), ("embed", "heads", "head_dim")) in seen
    assert m2.lm_head[...].sharding.spec == PartitionSpec("data")
    ref = plain(jnp.asarray(IDS))
    np.testing.assert_allclose(m(jnp.asarray(IDS)), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m2(jnp.asarray(IDS)), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="shardings must be"):
        load_hf(path, shardings="fsdp")


# ----------------------------------------------------------------------------- malformed
def _rewrite(path: Path, edit):
    f = path / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
     r"missing tensor\(s\) model\.layers\.1\.mlp\.up_proj\.weight \(expected shape \(96, 64\)\)"),
    (lambda t: t.update({"model.layers.0.self_attn.extra.weight": np.zeros((3, 5), np.float32)}),
     r"unexpected tensor\(s\) model\.layers\.0\.self_attn\.extra\.weight \(found shape \(3, 5\) in model\.safetensors\)"),
    (lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)}),
     r"tensor model\.layers\.0\.self_attn\.k_proj\.weight in model\.safetensors has shape \(64, 64\), "
     r"expected \(32, 64\)"),
], ids=["missing", "unexpected", "wrong_shape"])
def test_tensor_errors_name_the_tensor_and_shapes(tmp_path, edit, message):
    path = _copy("llama_gqa", tmp_path)
    _rewrite(path, edit)
    with pytest.raises(CheckpointError, match=message):
        load_hf(path)


def test_missing_shard_file(tmp_path):
    path = _copy("llama_gqa", tmp_path, max_shard_size="100KB")
    victim = sorted(path.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"lists shard '{victim.name}', which is missing"):
        load_hf(path)


class _Payload:
    """Unpickling this creates a marker file: proof that something was unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_only_folder_is_refused_unread(tmp_path):
    path = _copy("llama_gqa", tmp_path)
    (path / "model.safetensors").unlink()
    marker = tmp_path / "UNPICKLED"
    with open(path / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Payload(marker), f)
    with pytest.raises(CheckpointError, match=r"only pickle checkpoint files \(pytorch_model\.bin\).*refused"):
        load_hf(path)
    assert not marker.exists()


def test_unsupported_model_type(tmp_path):
    path = _copy("llama_gqa", tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(cfg, model_type="qwen2")))
    with pytest.raises(ValueError, match=r"config\.json: field 'model_type' is 'qwen2'; supported values: llama, mistral"):
        load_hf(path)


def test_unsupported_rope_type(tmp_path):
    path = _copy("llama_gqa", tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"field 'rope_parameters\.rope_type' is 'longrope'; "
                                         r"supported values: default, linear, llama3"):
        load_hf(path)


def test_non_empty_export_folder(tmp_path):
    src, _ = checkpoint("mqa_tied")
    with pytest.raises(FileExistsError, match=rf"export folder {src} is not empty"):
        save_hf(load_hf(src), src)


def test_tied_checkpoint_with_redundant_lm_head_and_legacy_buffers(tmp_path):
    """A saved copy of a tied lm_head and rotary inv_freq buffers are ignored, like transformers does."""
    path, hf = checkpoint("mqa_tied")
    path = Path(shutil.copytree(path, tmp_path / "ckpt"))

    def edit(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)

    _rewrite(path, edit)
    assert rel_err(load_hf(path)(jnp.asarray(IDS)), torch_logits(hf, IDS)) <= TOL


def test_chunked_reads_and_casts_are_exact(monkeypatch):
    """Tensors read in many small chunks (and cast from bf16) equal a plain whole-tensor read."""
    path, _ = checkpoint("llama_gqa", dtype=torch.bfloat16)
    whole = load_hf(path)
    monkeypatch.setattr(safetensors_io, "CHUNK_BYTES", 300)  # a handful of rows per chunk
    reads = []
    real_open = safetensors_io.safe_open

    def counting_open(*a, **k):
        reads.append(a[0])
        return real_open(*a, **k)

    monkeypatch.setattr(safetensors_io, "safe_open", counting_open)
    chunked = load_hf(path)
    assert len(reads) > 10 * len(hf_io.hf_tensor_shapes(whole.config))
    for a, b in zip(jax.tree.leaves(nnx.state(chunked)), jax.tree.leaves(nnx.state(whole))):
        assert a.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ref = load_file(path / "model.safetensors")["model.layers.1.mlp.down_proj.weight"]
    np.testing.assert_array_equal(np.asarray(chunked.layers[1].mlp.down_proj[...]), ref.astype(np.float32))


@pytest.mark.slow
def test_bench_load_script_runs(tmp_path):
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "scripts" / "bench_load.py"), "--size-gb", "0.05",
                          "--dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    m = re.search(r"peak RSS \(VmHWM\): ([\d.]+) GB.*loaded params ([\d.]+) GB", out.stdout)
    base = float(re.search(r"baseline RSS after importing jax: ([\d.]+) GB", out.stdout).group(1))
    peak, params = float(m.group(1)), float(m.group(2))
    assert 0.04 < params < 0.06 and peak >= base + 0.9 * params
    assert re.search(r"peak / checkpoint = [\d.]+", out.stdout)
    assert list(tmp_path.iterdir()) == []  # the temporary checkpoint was removed


def test_parse_size():
    assert hf_io.parse_size("5GB") == 5 * 10**9
    assert hf_io.parse_size("2GiB") == 2 * 2**30
    assert hf_io.parse_size("500 mb") == 500 * 10**6
    assert hf_io.parse_size(1234) == 1234
    with pytest.raises(ValueError, match="max_shard_size 'lots'"):
        hf_io.parse_size("lots")
