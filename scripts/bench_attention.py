"""cuDNN attention against XLA's: the same random model's logits and the speed of each.

One random-init LLaMA (the given shape, ``--dtype``) is built once; the same parameters run
with ``attention_impl="xla"`` and ``"cudnn"`` (`jax_unlearn.models.ModelOptions`). The script
prints, as JSON lines, the largest logit difference relative to the largest logit magnitude
(with ``ok`` against ``--tol``: bfloat16 rounding of the attention output, ~2**-8 per layer,
passed through the layers) on left-padded rows (padding masked, as in training), and for each
implementation the median time of a forward pass and of a forward + backward pass
(mean label log-probability).
Where cuDNN's kernel is missing (CPU, or a GPU and dtype it does not support) the cudnn row says
why and only XLA is timed.

    python scripts/bench_attention.py --size 1b --batch 8 --seq 512 --dtype bfloat16   # GPU
    python scripts/bench_attention.py --size 20m --batch 2 --seq 64 --dtype float32     # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_step import SIZES
from flax import nnx

from jax_unlearn.models import CausalLM, ModelConfig, ModelOptions
from jax_unlearn.token_math import label_logprobs


def timed(fn, *args, steps: int, warmup: int = 2) -> float:
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(cfg: ModelConfig, options: ModelOptions, params, ids, mask, labels, a) -> np.ndarray | None:
    """Prints one implementation's row; returns its float32 logits (None when it cannot run)."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: CausalLM(cfg, options, rngs=nnx.Rngs(0))))

    @jax.jit
    def forward(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, mask)

    @jax.jit
    def grad(state, ids, mask, labels):
        def loss(s):
            lp, valid = label_logprobs(nnx.merge(graphdef, s)(ids, mask), labels)
            return -(lp * valid).sum() / valid.sum()
        return jax.grad(loss)(state)

    impl, device = options.attention_impl, jax.devices()[0].device_kind
    try:
        logits = jax.block_until_ready(forward(params, ids, mask))
    except Exception as err:  # noqa: BLE001 - report why cuDNN's kernel cannot run here
        if impl == "xla":
            raise
        print(json.dumps({"impl": impl, "available": False, "device": device,
                          "why": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}), flush=True)
        return None
    row = {"impl": impl, "available": True, "size": a.size, "batch": a.batch, "seq": a.seq, "dtype": a.dtype,
           "device": device, "forward_s": round(timed(forward, params, ids, mask, steps=a.steps), 5),
           "forward_backward_s": round(timed(grad, params, ids, mask, labels, steps=a.steps), 5)}
    print(json.dumps(row), flush=True)
    return np.asarray(logits.astype(jnp.float32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="20m", choices=sorted(SIZES))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--tol", type=float, default=None, help="relative logit tolerance (default: 2**-6 in "
                    "bfloat16, 1e-4 in float32)")
    a = ap.parse_args()
    dtype = jnp.dtype(a.dtype)
    tol = a.tol if a.tol is not None else (2.0**-6 if dtype == jnp.bfloat16 else 1e-4)
    cfg = ModelConfig(model_type="llama", max_position_embeddings=max(a.seq, 128), **SIZES[a.size])
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (a.batch, a.seq)), jnp.int32)
    pad = rng.integers(0, a.seq // 4, a.batch)  # left padding, as a batch of ragged rows has
    mask = jnp.asarray(np.arange(a.seq)[None, :] >= pad[:, None], jnp.int32)
    labels = jnp.where(mask == 1, ids, -100)

    params = nnx.state(CausalLM(cfg, ModelOptions(param_dtype=dtype, scan_layers=True), rngs=nnx.Rngs(0)))
    out = {}
    for impl in ("xla", "cudnn"):
        out[impl] = measure(cfg, ModelOptions(param_dtype=dtype, attention_impl=impl, scan_layers=True), params,
                            ids, mask, labels, a)
    if out.get("xla") is not None and out.get("cudnn") is not None:
        valid = np.asarray(mask, bool)
        ref, got = out["xla"][valid], out["cudnn"][valid]
        rel = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
        print(json.dumps({"compare": "cudnn vs xla logits", "max_abs_diff_over_max_abs": rel, "tol": tol,
                          "ok": rel <= tol, "argmax_agreement": float(np.mean(got.argmax(-1) == ref.argmax(-1)))}),
              flush=True)


if __name__ == "__main__":
    main()
