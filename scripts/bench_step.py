"""Measures the naive, PCGrad and SAGO unlearning steps in one process and prints ratios to naive.

Random-init LLaMA of the given shape; forget and retain batches of ``batch x seq`` random
tokens each (GradDiff: ``L_f = -NLL``, ``L_r = NLL``); AdamW after global-norm clipping.

- naive: one backward pass of ``L_f + L_r`` (loss summation, like the PyTorch peer's naive);
- pcgrad / sago: two gradients combined by the optax combiner at the head of the chain.

Each step is jitted with the state donated, warmed up, then timed ``--steps`` times; the
script prints the median step time, tokens/s (forget + retain tokens), model TFLOP/s
(``6 * params * tokens``, attention excluded, as the peer counts it) and peak device memory
(GPU/TPU ``memory_stats``; on CPU the process's peak resident memory), with ratios to naive.

    python scripts/bench_step.py                       # ~20M parameters on CPU
    python scripts/bench_step.py --size 1b --batch 8 --seq 512 --dtype bfloat16 \\
        --attention cudnn --scan --remat dots_with_no_batch_dims_saveable --logit-chunk 128  # LLaMA-3.2-1B shape
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jax_unlearn as ju
from jax_unlearn import objectives as obj
from jax_unlearn import step as st
from jax_unlearn.models import CausalLM, ModelConfig, ModelOptions

SIZES = {
    "20m": dict(vocab_size=8192, hidden_size=384, intermediate_size=1536, num_hidden_layers=8,
                num_attention_heads=6, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
               rope_theta=500000.0),
}


def peak_memory_gib() -> float | None:
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (host RSS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="20m", choices=sorted(SIZES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--attention", default=None, choices=[None, "xla", "cudnn"])
    ap.add_argument("--scan", action="store_true", help="scan over layers")
    ap.add_argument("--remat", default=None, help="remat policy (e.g. full, dots_with_no_batch_dims_saveable)")
    ap.add_argument("--logit-chunk", type=int, default=None,
                    help="label log-probs over this many positions at a time (no [b, s, vocab] float32 logits)")
    ap.add_argument("--kinds", default="naive,pcgrad,sago")
    a = ap.parse_args()

    dtype = jnp.dtype(a.dtype)
    cfg = ModelConfig(model_type="llama", max_position_embeddings=max(a.seq, 128), **SIZES[a.size])
    options = ModelOptions(param_dtype=dtype, attention_impl=a.attention, scan_layers=a.scan, remat_policy=a.remat)
    rng = np.random.default_rng(1)
    batch = lambda: {"input_ids": jnp.asarray(rng.integers(0, cfg.vocab_size, (a.batch, a.seq)), jnp.int32),
                     "attention_mask": jnp.ones((a.batch, a.seq), jnp.int32)}
    fb, rb = batch(), batch()
    fb["labels"], rb["labels"] = fb["input_ids"], rb["input_ids"]
    tokens = 2 * a.batch * a.seq
    objective = obj.grad_diff(logit_chunk=a.logit_chunk)
    adam = lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-5, weight_decay=0.0))
    kinds = {
        "naive": (adam(), st.StepConfig(mode="naive")),
        "pcgrad": (optax.chain(ju.pcgrad(), adam()), st.StepConfig()),
        "sago": (optax.chain(ju.sago(), adam()), st.StepConfig()),
    }
    results = {}
    for kind in a.kinds.split(","):
        tx, step_cfg = kinds[kind]
        model = CausalLM(cfg, options, rngs=nnx.Rngs(0))
        n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        defs, state = st.init_state(model, tx, objective, copy=False)
        del model
        step = st.make_two_grad_step(defs, objective, tx, step_cfg)
        times = []
        for i in range(a.warmup + a.steps):
            t = time.perf_counter()
            state, metrics = step(state, fb, rb)
            jax.block_until_ready((state, metrics))
            if i >= a.warmup:
                times.append(time.perf_counter() - t)
        med = statistics.median(times)
        results[kind] = dict(kind=kind, size=a.size, params=int(n_params), tokens_per_step=tokens, step_s=round(med, 5),
                             tokens_per_s=round(tokens / med, 1), model_tflops=round(6 * n_params * tokens / med / 1e12, 3),
                             peak_gib=round(peak_memory_gib(), 2), device=jax.devices()[0].device_kind,
                             dtype=a.dtype, jax=jax.__version__)
        print(json.dumps(results[kind]), flush=True)
        del state, step
    if "naive" in results:
        base = results["naive"]
        for kind, r in results.items():
            print(f"{kind:7s} step {r['step_s']:.4f}s  {r['tokens_per_s']:>10.1f} tok/s  "
                  f"time/naive {r['step_s'] / base['step_s']:.3f}  peak {r['peak_gib']} GiB")
    print("note: peak memory is cumulative over the kinds run so far in this process "
          "(run one --kinds at a time for per-kind peaks)")


if __name__ == "__main__":
    main()
