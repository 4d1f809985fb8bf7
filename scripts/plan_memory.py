"""Per-device memory of one unlearning step, planned by the compiler without allocating anything.

The step (`jax_unlearn.step.make_two_grad_step`: two gradients, a combiner at the head of an
AdamW chain) is compiled ahead of time on abstract arrays for a model shape and a mesh of fake
CPU devices; the report splits each device's bytes into parameters, optimizer state, the
reference model, the two gradients and the compiler's temporaries (activations, gathered
weights). The numbers are XLA:CPU's; a GPU/TPU compiler fuses and schedules differently, so
treat them as estimates until checked on the accelerator. XLA:CPU has no bfloat16 arithmetic: it
computes in float32 and keeps float32 copies of some bfloat16 buffers (gradients, updates), so
with bfloat16 parameters the temporaries are overestimated; its loop-invariant code motion would
also hoist float32 copies of all layers' weights out of the layer scan, so the script disables
that pass (``--cpu-licm`` keeps it).

    python scripts/plan_memory.py --model 8b --objective npo --combiner sago --mesh 1,8,1
    python scripts/plan_memory.py --model path/to/config.json --devices 64 --batch 64
    python scripts/plan_memory.py --model 8b --devices 1 --lora-rank 16 --lora-targets all-linear

Named shapes: 1b (Llama-3.2-1B), 3b (Llama-3.2-3B), 8b (Llama-3.1-8B), 70b (Llama-3.1-70B).
``--devices N`` is the mesh ``1,N,1`` (pure FSDP); the script starts with
``--xla_force_host_platform_device_count`` set to the mesh's size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

SHAPES = {
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
               num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="8b", help="a named shape (1b, 3b, 8b, 70b) or a Hugging Face config.json")
    ap.add_argument("--objective", default="npo", help="grad_ascent, grad_diff, npo, simnpo or rmu")
    ap.add_argument("--retain", default="nll", choices=["nll", "kl"])
    ap.add_argument("--reference", default="resident", choices=["resident", "precompute"], help="NPO's reference")
    ap.add_argument("--combiner", default="sago", help="weighted_sum, pcgrad or sago")
    ap.add_argument("--mesh", default=None, help="data,fsdp,tensor (default: 1,DEVICES,1)")
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8, help="rows per task (forget and retain each)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--micro-batches", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", help="parameter dtype")
    ap.add_argument("--compute-dtype", default=None, help="compute dtype (float32 master weights: "
                                                          "--dtype float32 --compute-dtype bfloat16)")
    ap.add_argument("--moment-dtype", default=None, choices=[None, "float32", "bfloat16"])
    ap.add_argument("--no-scan", action="store_true", help="one program per layer (slow to compile)")
    ap.add_argument("--remat", default="full", help="remat policy per layer ('' for none)")
    ap.add_argument("--logit-chunk", type=int, default=128)
    ap.add_argument("--lora-rank", type=int, default=None, help="train LoRA adapters of this rank only")
    ap.add_argument("--lora-targets", default="q_proj,v_proj")
    ap.add_argument("--cpu-licm", action="store_true",
                    help="keep XLA:CPU's loop-invariant code motion, which hoists f32 copies of every "
                         "layer's bf16 weights out of the layer scan (a CPU-only cost; off by default)")
    ap.add_argument("--json", default=None, help="append the report as one JSON line to this file")
    ap.add_argument("--table", nargs="+", default=None, metavar="JSONL",
                    help="print the reports in these files as a Markdown table and exit")
    return ap.parse_args(argv)


def mesh_shape(a: argparse.Namespace) -> tuple[int, int, int]:
    if a.mesh:
        return tuple(int(x) for x in a.mesh.split(","))
    return (1, a.devices, 1)


def model_config(name: str):
    from jax_unlearn.models import ModelConfig

    if name in SHAPES:
        return ModelConfig(model_type="llama", rope_theta=500000.0, max_position_embeddings=131072, **SHAPES[name])
    return ModelConfig.from_json_file(name)


def device_bytes(tree) -> int:
    """Bytes one device holds of the arrays of ``tree`` (``ShapeDtypeStruct``s with shardings)."""
    import jax

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def plan(model_cfg, *, objective: str = "npo", retain: str = "nll", reference: str = "resident",
         combiner: str = "sago", mesh: tuple[int, int, int] = (1, 8, 1), batch: int = 8, seq: int = 512,
         micro_batches: int = 1, dtype: str = "bfloat16", compute_dtype: str | None = None,
         moment_dtype: str | None = None, scan: bool = True, remat: str | None = "full",
         logit_chunk: int | None = 128, lora_rank: int | None = None, lora_targets: str = "q_proj,v_proj",
         devices: list | None = None, mode: str = "combined", step_options: dict | None = None) -> dict:
    """Compiles the step on abstract arrays and returns its per-device bytes (see the module doc).
    ``devices``: the mesh's devices (default ``jax.devices()``; compile-only TPU/GPU devices of
    ``jax.experimental.topologies`` work); ``mode``: the step's mode (``"naive"``: one backward);
    ``step_options``: other `jax_unlearn.step.StepConfig` fields."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jax_unlearn import config as C
    from jax_unlearn import objectives as obj
    from jax_unlearn import sharding as sh
    from jax_unlearn import step as st
    from jax_unlearn.models import CausalLM, ModelOptions, add_lora

    options = ModelOptions(param_dtype=jnp.dtype(dtype), compute_dtype=None if compute_dtype is None else
                           jnp.dtype(compute_dtype), scan_layers=scan, remat_policy=remat)

    def build():
        model = CausalLM(model_cfg, options, rngs=nnx.Rngs(0))
        if lora_rank is not None:
            targets = lora_targets if lora_targets == "all-linear" else tuple(lora_targets.split(","))
            model = add_lora(model, rank=lora_rank, alpha=2.0 * lora_rank, targets=targets)
        return model

    model = nnx.eval_shape(build)
    cfg = C.TrainConfig(output_dir="-", batch_size=batch, micro_batches=micro_batches, mode=mode,
                        optim=C.OptimConfig(moment_dtype=moment_dtype),
                        combiner=C.CombinerConfig(name=combiner),
                        objective=C.ObjectiveConfig(name=objective, retain=retain, logit_chunk=logit_chunk,
                                                    reference=reference,
                                                    **({"layer": min(7, model_cfg.num_hidden_layers - 1)}
                                                       if objective == "rmu" else {})))
    objective_ = C.build_objective(cfg.objective, model_cfg.hidden_size)
    tx = C.build_tx(cfg, total_steps=100)
    defs, state = st.abstract_state(model, tx, objective_, train=nnx.LoRAParam if lora_rank is not None else None)
    device_mesh = sh.make_mesh(sh.MeshConfig(*mesh), devices)
    shardings = sh.train_state_shardings(state, device_mesh, tx)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    bs = sh.batch_sharding(device_mesh)
    step_cfg = dataclasses.replace(C.step_config(cfg), **(step_options or {}))
    step = st.make_two_grad_step(defs, objective_, tx, step_cfg, shardings, bs)
    tokens = {k: jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=bs) for k in ("input_ids", "attention_mask",
                                                                                      "labels")}
    forget = dict(tokens, **({obj.REF_LOGP: jax.ShapeDtypeStruct((batch,), jnp.float32, sharding=bs)}
                             if reference == "precompute" else {}))
    t0 = time.perf_counter()
    compiled = step.lower(state, forget, tokens).compile()
    compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    params, frozen = device_bytes(state.params), device_bytes(state.frozen)
    grads = 2 * params  # the forget and the retain gradient, sharded like the parameters
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    try:  # the TPU executable's text does not parse back (async-update instructions)
        moved = sh.collective_bytes(compiled.as_text(), state.params, device_mesh)
    except Exception:  # noqa: BLE001 - the memory numbers stand without the collective count
        moved = {"weights": 0, "activations": 0}
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return {
        "model_params": int(n_params),
        "trainable_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "mesh": list(mesh), "devices": math.prod(mesh), "batch": batch, "seq": seq, "micro_batches": micro_batches,
        "objective": objective, "reference": reference if objective == "npo" else None, "retain": retain,
        "combiner": combiner, "dtype": dtype, "compute_dtype": compute_dtype, "moment_dtype": moment_dtype,
        "lora_rank": lora_rank, "lora_targets": lora_targets if lora_rank is not None else None,
        "scan": scan, "remat": remat, "logit_chunk": logit_chunk,
        "bytes": {
            "params": params,  # trainable parameters
            "frozen": frozen,  # the rest of the model (LoRA's base weights, RMU's other layers)
            "optimizer": device_bytes(state.opt_state),
            "reference": device_bytes(state.ref),
            "gradients": grads,
            "arguments": m.argument_size_in_bytes,
            "temp": m.temp_size_in_bytes,
            "activations_and_temp": max(m.temp_size_in_bytes - grads, 0),
            "peak": peak,
        },
        "collective_bytes": moved,
        "compile_s": round(compile_s, 1),
        "platform": f"{device_mesh.devices.flat[0].platform} x{device_mesh.size} (jax {jax.__version__})",
    }


def gib(n: int) -> str:
    return f"{n / 2**30:8.2f} GiB"


def report(r: dict) -> str:
    b = r["bytes"]
    rows = [
        ("parameters (trainable)", b["params"]), ("frozen weights", b["frozen"]), ("optimizer state", b["optimizer"]),
        ("reference model", b["reference"]), ("two gradients (in temp)", b["gradients"]),
        ("activations and other temp", b["activations_and_temp"]), ("total (peak)", b["peak"]),
    ]
    head = (f"{r['model_params'] / 1e9:.2f}B parameters ({r['trainable_params'] / 1e9:.3f}B trainable), "
            f"mesh {r['mesh']} ({r['devices']} devices), {r['objective']}"
            + (f"/{r['reference']}" if r["reference"] else "") + f" + {r['combiner']}, "
            f"batch {r['batch']}x{r['seq']}, {r['dtype']}" + (f"->{r['compute_dtype']}" if r["compute_dtype"] else "")
            + (f", moments {r['moment_dtype']}" if r["moment_dtype"] else "")
            + (f", LoRA r={r['lora_rank']} on {r['lora_targets']}" if r["lora_rank"] else ""))
    lines = [head, "per device:"] + [f"  {k:<28s}{gib(v)}" for k, v in rows]
    c = r["collective_bytes"]
    lines.append(f"collectives per step (static count): weights {gib(c['weights'])}, activations {gib(c['activations'])}")
    lines.append(f"compiled in {r['compile_s']} s on {r['platform']}; XLA:CPU estimates")
    return "\n".join(lines)


def markdown(reports: list[dict]) -> str:
    """One table row per report (GiB per device)."""
    cols = ["params", "frozen", "optimizer", "reference", "gradients", "activations_and_temp", "peak"]
    head = ("| model | devices | batch | setup | " + " | ".join(
        ["params", "frozen", "optimizer", "reference", "2 grads", "act. + temp", "**total**"]) + " | compile s |")
    lines = [head, "|" + "---|" * (len(cols) + 5)]
    for r in reports:
        setup = [f"{r['objective']}" + (f"/{r['reference']}" if r.get("reference") else "") + f"+{r['combiner']}",
                 r["dtype"] + (f"->{r['compute_dtype']}" if r.get("compute_dtype") else "")]
        if r.get("moment_dtype"):
            setup.append(f"moments {r['moment_dtype']}")
        if r.get("lora_rank"):
            setup.append(f"LoRA r={r['lora_rank']} {r['lora_targets']}")
        if r.get("remat") != "full":
            setup.append(f"remat {r.get('remat')}")
        b = r["bytes"]
        cells = [f"{b[c] / 2**30:.2f}" for c in cols[:-1]] + [f"**{b['peak'] / 2**30:.2f}**"]
        lines.append(f"| {r.get('model', '?')} | {r['devices']} | {r['batch']}x{r['seq']} | {', '.join(setup)} | "
                     + " | ".join(cells) + f" | {r['compile_s']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.table:
        print(markdown([json.loads(line) for path in a.table for line in open(path) if line.strip()]))
        return
    n = math.prod(mesh_shape(a))
    if "jax" not in sys.modules:  # fake CPU devices for the mesh (must precede importing jax)
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        flags = [os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={n}"]
        if not a.cpu_licm:
            flags.append("--xla_disable_hlo_passes=while-loop-invariant-code-motion")
        os.environ["XLA_FLAGS"] = " ".join(flags).strip()
    r = plan(model_config(a.model), objective=a.objective, retain=a.retain, reference=a.reference,
             combiner=a.combiner, mesh=mesh_shape(a), batch=a.batch, seq=a.seq, micro_batches=a.micro_batches,
             dtype=a.dtype, compute_dtype=a.compute_dtype, moment_dtype=a.moment_dtype, scan=not a.no_scan,
             remat=a.remat or None, logit_chunk=a.logit_chunk or None, lora_rank=a.lora_rank,
             lora_targets=a.lora_targets)
    r["model"] = a.model
    print(report(r))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
