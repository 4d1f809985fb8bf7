"""Measures the naive, PCGrad and SAGO unlearning steps in one process and prints ratios to naive.

Random-init LLaMA of the given shape; forget and retain batches of ``batch x seq`` random
tokens each; the step, objective and optimizer are a run's (`jax_unlearn.config`: the combiner
at the head of ``clip_by_global_norm(1.0)`` + AdamW, with the combiner's diagnostics unless
``--no-diagnostics``), for GradDiff (``L_f = -NLL``, ``L_r = NLL``) or NPO (``--objective npo``,
its reference resident or precomputed into the forget batch with ``--reference precompute``).

- naive: one backward pass of ``L_f + L_r`` (loss summation, like the PyTorch peer's naive);
- pcgrad / sago: two gradients combined by the optax combiner at the head of the chain.

Each step is jitted with the state donated, warmed up, then timed ``--steps`` times; the
script prints the median step time, tokens/s (forget + retain tokens), model TFLOP/s
(``6 * params * tokens``, attention excluded, as the peer counts it) and peak device memory
(GPU/TPU ``memory_stats``; on CPU the process's peak resident memory), with ratios to naive.

    python scripts/bench_step.py                       # ~20M parameters on CPU
    python scripts/bench_step.py --size 1b --batch 8 --seq 512 --dtype bfloat16 \\
        --attention cudnn --scan --remat dots_with_no_batch_dims_saveable --logit-chunk 128  # LLaMA-3.2-1B shape
    python scripts/bench_step.py --size 8b --kinds sago --objective npo --reference precompute \\
        --dtype bfloat16 --moment-dtype bfloat16 --scan --remat full --logit-chunk 128    # one-GPU 8B

Named shapes: tiny, 20m, and `jax_unlearn.plan.SHAPES` (1b, 3b, 8b, 70b, mistral-7b).
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
from flax import nnx

from jax_unlearn import config as C
from jax_unlearn import step as st
from jax_unlearn.models import CausalLM, ModelConfig, ModelOptions
from jax_unlearn.plan.shapes import SHAPES

SIZES = {  # ModelConfig fields besides model_type and max_position_embeddings (set from --seq)
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32, tie_word_embeddings=True),
    "20m": dict(vocab_size=8192, hidden_size=384, intermediate_size=1536, num_hidden_layers=8,
                num_attention_heads=6, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True),
    **{name: {k: v for k, v in shape.items() if k not in ("model_type", "max_position_embeddings")}
       for name, shape in SHAPES.items()},
}


def peak_memory_gib() -> float | None:
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (host RSS)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="20m", choices=sorted(SIZES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--moment-dtype", default=None, choices=[None, "float32", "bfloat16"])
    ap.add_argument("--attention", default=None, choices=[None, "xla", "cudnn"])
    ap.add_argument("--scan", action="store_true", help="scan over layers")
    ap.add_argument("--remat", default=None, help="remat policy (e.g. full, dots_with_no_batch_dims_saveable)")
    ap.add_argument("--logit-chunk", type=int, default=None,
                    help="label log-probs over this many positions at a time (no [b, s, vocab] float32 logits)")
    ap.add_argument("--objective", default="grad_diff", choices=["grad_diff", "npo"])
    ap.add_argument("--reference", default="resident", choices=["resident", "precompute"], help="NPO's reference")
    ap.add_argument("--no-diagnostics", action="store_true", help="combiners without their cosine/norm metrics")
    ap.add_argument("--kinds", default="naive,pcgrad,sago")
    ap.add_argument("--chunk-head", action="store_true", help="chunk_head: the head's retain gradient by vocab chunks")
    a = ap.parse_args(argv)

    dtype = jnp.dtype(a.dtype)
    cfg = ModelConfig(model_type="llama", max_position_embeddings=max(a.seq, 128), **SIZES[a.size])
    options = ModelOptions(param_dtype=dtype, attention_impl=a.attention, scan_layers=a.scan, remat_policy=a.remat)
    rng = np.random.default_rng(1)
    batch = lambda: {"input_ids": rng.integers(0, cfg.vocab_size, (a.batch, a.seq)).astype(np.int32),
                     "attention_mask": np.ones((a.batch, a.seq), np.int32)}
    fb, rb = batch(), batch()
    fb["labels"], rb["labels"] = fb["input_ids"], rb["input_ids"]
    tokens = 2 * a.batch * a.seq
    results = {}
    for kind in a.kinds.split(","):
        run = C.TrainConfig(output_dir="-", batch_size=a.batch, mode="naive" if kind == "naive" else "combined",
                            chunk_head=a.chunk_head and kind != "naive",
                            optim=C.OptimConfig(lr=1e-5, moment_dtype=a.moment_dtype),
                            combiner=C.CombinerConfig(name="weighted_sum" if kind == "naive" else kind,
                                                      diagnostics=not a.no_diagnostics),
                            objective=C.ObjectiveConfig(name=a.objective, logit_chunk=a.logit_chunk,
                                                        reference=a.reference))
        objective = C.build_objective(run.objective, cfg.hidden_size)
        tx = C.build_tx(run, total_steps=a.warmup + a.steps)
        model = CausalLM(cfg, options, rngs=nnx.Rngs(0))
        n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        forget = fb
        t = time.perf_counter()
        if a.reference == "precompute":  # NPO's reference log-probs, once (not timed with the steps)
            forget = st.add_reference_logprobs(model, fb, batch_size=a.batch, logit_chunk=a.logit_chunk)
        precompute_s = time.perf_counter() - t
        forget, retain = jax.tree.map(jnp.asarray, (dict(forget), rb))
        defs, state = st.init_state(model, tx, objective, copy=False)
        del model
        step = st.make_two_grad_step(defs, objective, tx, C.step_config(run, options))
        times = []
        for i in range(a.warmup + a.steps):
            t = time.perf_counter()
            state, metrics = step(state, forget, retain)
            jax.block_until_ready((state, metrics))
            if i >= a.warmup:
                times.append(time.perf_counter() - t)
        med = statistics.median(times)
        results[kind] = dict(kind=kind, size=a.size, objective=a.objective, reference=a.reference,
                             params=int(n_params), tokens_per_step=tokens, step_s=round(med, 5),
                             tokens_per_s=round(tokens / med, 1), model_tflops=round(6 * n_params * tokens / med / 1e12, 3),
                             peak_gib=round(peak_memory_gib(), 2), device=jax.devices()[0].device_kind,
                             dtype=a.dtype, moment_dtype=a.moment_dtype, diagnostics=not a.no_diagnostics,
                             loss_finite=bool(np.isfinite(float(metrics["forget_loss"]))),
                             precompute_s=round(precompute_s, 2) if a.reference == "precompute" else None,
                             jax=jax.__version__)
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
