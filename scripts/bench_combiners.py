"""Times each combiner's jitted update against the memory-bound floor ``gamma*f + alpha*r``.

Every registered combiner is timed (``jax_unlearn.COMBINERS``), with and without its diagnostics.
A global combiner (blur, gru, ngdiff, the multi-task aggregators, pcgrad global) needs its sums
over all leaves before it can write any coordinate, so it reads both gradients twice: its floor
is ~5/3 of the element-wise one (GRU also reads and writes its retain average: ~8/3).

The gradients are a ~100M-parameter pytree with LLaMA-like leaf shapes (tied embedding,
GQA attention, SwiGLU MLP, RMSNorm scales), float32 by default. Every function is jitted,
warmed up, then timed ``--repeats`` times in turns (floor, combiner, floor, ...) within one
process; the script prints the median seconds and the ratio to the floor's median.

    python scripts/bench_combiners.py [--hidden 768 --layers 10 --dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

import jax_unlearn as ju


def llama_like_shapes(vocab: int, hidden: int, inter: int, layers: int, heads: int, kv_heads: int) -> dict:
    """Leaf shapes of a LLaMA decoder with tied embeddings (HF layout ``[out, in]``)."""
    hd = hidden // heads
    layer = {
        "q_proj": (heads * hd, hidden), "k_proj": (kv_heads * hd, hidden), "v_proj": (kv_heads * hd, hidden),
        "o_proj": (hidden, heads * hd), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
        "down_proj": (hidden, inter), "input_layernorm": (hidden,), "post_attention_layernorm": (hidden,),
    }
    tree = {"embed_tokens": (vocab, hidden), "norm": (hidden,)}
    tree.update({f"layers_{i}": dict(layer) for i in range(layers)})
    return tree


def random_tree(shapes: dict, key: jax.Array, dtype) -> dict:
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, s, dtype) for k, s in zip(keys, leaves)])


def timed(fn, *args) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=9)
    a = ap.parse_args()

    shapes = llama_like_shapes(a.vocab, a.hidden, a.intermediate, a.layers, a.heads, a.kv_heads)
    dtype = jnp.dtype(a.dtype)
    f = random_tree(shapes, jax.random.PRNGKey(0), dtype)
    r = random_tree(shapes, jax.random.PRNGKey(1), dtype)
    n = sum(x.size for x in jax.tree.leaves(f))
    alpha, gamma = 1.0, 0.5

    floor = jax.jit(lambda f, r: jax.tree.map(lambda x, y: gamma * x + alpha * y, f, r))
    # The variants of the first three, then every other registered combiner at its defaults.
    variants = [("weighted_sum", ju.weighted_sum, {}), ("sago", ju.sago, {}), ("sago_sum", ju.sago, {"agree": "sum"}),
                ("pcgrad_module", ju.pcgrad, {"scope": "module"}), ("pcgrad_global", ju.pcgrad, {"scope": "global"})]
    variants += [(name, ju.COMBINERS.get(name), {}) for name in ju.COMBINERS.names()
                 if name not in ("weighted_sum", "pcgrad", "sago")]
    combiners = {name: factory(alpha, gamma, **kw) for name, factory, kw in variants}
    # The same combiners without the diagnostic sums (diagnostics=False).
    combiners.update({name + "/nodiag": factory(alpha, gamma, diagnostics=False, **kw) for name, factory, kw in variants})
    fns = {"floor": floor}
    for name, tx in combiners.items():
        state = tx.init(f)  # stateful combiners (gru, grad_vac, nash_mtl) update from their initial state
        fns[name] = jax.jit(lambda f, r, tx=tx, state=state: tx.update(ju.TwoTaskGrads(f, r), state))
    for fn in fns.values():  # compile and warm up
        for _ in range(2):
            timed(fn, f, r)

    times = {name: [] for name in fns}
    for _ in range(a.repeats):  # interleave so that machine noise hits every function alike
        for name, fn in fns.items():
            times[name].append(timed(fn, f, r))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"# {n / 1e6:.1f}M parameters in {len(jax.tree.leaves(f))} leaves, {a.dtype}, "
          f"{jax.devices()[0].platform} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
          f"jax {jax.__version__}, median of {a.repeats}")
    print(f"{'function':26s} {'seconds':>9s} {'x floor':>8s} {'GB/s (2 reads + 1 write)':>26s}")
    bytes_moved = 3 * n * dtype.itemsize
    for name, s in med.items():
        print(f"{name:26s} {s:9.4f} {s / med['floor']:8.2f} {bytes_moved / s / 1e9:26.1f}")
    print(json.dumps({"params": n, "dtype": a.dtype, "median_s": med,
                      "ratio_to_floor": {k: v / med["floor"] for k, v in med.items()}}))


if __name__ == "__main__":
    main()
