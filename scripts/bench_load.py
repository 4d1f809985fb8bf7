"""Peak host memory of `load_hf` relative to checkpoint size.

Writes a synthetic LLaMA-shaped checkpoint (random weights, ``--size-gb`` of safetensors, HF
layout: ``config.json`` + shards + index, or one file with ``--single-file``) into a temporary
folder, then loads it with `jax_unlearn.models.load_hf` in a fresh Python process and reports

* ``baseline_rss``: resident memory after importing jax + jax_unlearn and starting the backend,
* ``peak_rss``: the process's high-water mark (``VmHWM``, same as ``ru_maxrss``) after loading,
* ``peak / checkpoint`` and ``(peak - baseline) / checkpoint`` (target: peak / checkpoint <= 1.3).

On a CPU backend the loaded arrays live in host memory, so 1.0 is the floor for the second
ratio; what this measures is the loader's overhead on top (copies, file mappings).

    python scripts/bench_load.py --size-gb 1.0 [--dtype bfloat16] [--scan-layers] [--single-file]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def synthetic_config(size_bytes: int, itemsize: int) -> dict:
    """A LLaMA-like config (GQA, untied) whose checkpoint is about ``size_bytes``."""
    if size_bytes >= 5e8:
        vocab, hidden, inter, heads, kv, head_dim = 32000, 1024, 2816, 16, 8, 64
    else:  # small smoke-test checkpoints
        vocab, hidden, inter, heads, kv, head_dim = 8000, 256, 704, 4, 2, 64
    per_layer = (2 * hidden + hidden * heads * head_dim * 2 + 2 * hidden * kv * head_dim
                 + 3 * hidden * inter) * itemsize
    fixed = (2 * vocab * hidden + hidden) * itemsize
    layers = max(1, round((size_bytes - fixed) / per_layer))
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab, hidden_size=hidden,
                intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, head_dim=head_dim, rms_norm_eps=1e-5, hidden_act="silu",
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
                max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)


def write_checkpoint(path: Path, size_bytes: int, dtype: str, single_file: bool, shard_bytes: int) -> int:
    """Write config + random safetensors shard by shard; returns the tensor bytes written."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    sys.path.insert(0, str(ROOT))
    from jax_unlearn.models.config import ModelConfig
    from jax_unlearn.models.hf_io import hf_tensor_shapes

    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    cfg = synthetic_config(size_bytes, np_dtype.itemsize)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(dict(cfg, dtype=dtype), indent=2))
    shapes = hf_tensor_shapes(ModelConfig.from_hf_dict(cfg))
    limit = size_bytes * 2 if single_file else shard_bytes
    groups, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * np_dtype.itemsize
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    rng = np.random.default_rng(0)
    weight_map, total = {}, 0
    for k, group in enumerate(groups, 1):
        fname = "model.safetensors" if len(groups) == 1 else f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (0.02 * rng.standard_normal(s, dtype=np.float32)).astype(np_dtype) for n, s in group}
        total += sum(t.nbytes for t in tensors.values())
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        weight_map |= {n: fname for n, _ in group}
        del tensors
    if len(groups) > 1:
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def child(path: str, dtype: str, scan_layers: bool) -> None:
    """Runs in a fresh process: baseline RSS, load, peak RSS; prints one JSON line."""
    sys.path.insert(0, str(ROOT))
    import jax
    import jax.numpy as jnp

    from jax_unlearn.models import load_hf

    jnp.zeros(()).block_until_ready()  # start the backend
    baseline = _status("VmRSS")
    t0 = time.perf_counter()
    model = load_hf(path, dtype=getattr(jnp, dtype), scan_layers=scan_layers)
    from flax import nnx

    leaves = jax.tree.leaves(nnx.state(model))
    jax.block_until_ready(leaves)
    seconds = time.perf_counter() - t0
    print(json.dumps({
        "baseline_rss": baseline,
        "peak_rss": _status("VmHWM"),
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "final_rss": _status("VmRSS"),
        "param_bytes": sum(x.nbytes for x in leaves),
        "load_seconds": seconds,
        "backend": jax.default_backend(),
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.0, help="checkpoint size in GB (1e9 bytes)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype of the checkpoint and of the loaded parameters")
    ap.add_argument("--scan-layers", action="store_true", help="load into the stacked (scanned) layout")
    ap.add_argument("--single-file", action="store_true", help="one model.safetensors instead of shards")
    ap.add_argument("--shard-mb", type=float, default=250.0, help="shard size when sharded")
    ap.add_argument("--dir", default=None, help="where to create the temporary checkpoint")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.dtype, args.scan_layers)
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench_load_", dir=args.dir))
    try:
        ckpt = tmp / "ckpt"
        t0 = time.perf_counter()
        size = write_checkpoint(ckpt, int(args.size_gb * 1e9), args.dtype, args.single_file,
                                int(args.shard_mb * 1e6))
        write_s = time.perf_counter() - t0
        cmd = [sys.executable, __file__, "--child", str(ckpt), "--dtype", args.dtype]
        if args.scan_layers:
            cmd.append("--scan-layers")
        env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:
            sys.exit(f"loading failed:\n{out.stderr}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        gb = 1e9
        n_files = len(list(ckpt.glob("*.safetensors")))
        print(f"checkpoint: {size / gb:.3f} GB {args.dtype} in {n_files} file(s) (written in {write_s:.1f}s); "
              f"scan_layers={args.scan_layers}; backend={r['backend']}")
        print(f"baseline RSS after importing jax: {r['baseline_rss'] / gb:.3f} GB")
        print(f"peak RSS (VmHWM): {r['peak_rss'] / gb:.3f} GB; ru_maxrss {r['ru_maxrss'] / gb:.3f} GB; "
              f"RSS after load {r['final_rss'] / gb:.3f} GB; loaded params {r['param_bytes'] / gb:.3f} GB "
              f"in {r['load_seconds']:.1f}s")
        print(f"peak / checkpoint = {r['peak_rss'] / size:.3f}   "
              f"(peak - baseline) / checkpoint = {(r['peak_rss'] - r['baseline_rss']) / size:.3f}   "
              f"target peak / checkpoint <= 1.3")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
