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

Named shapes: those of `jax_unlearn.plan.SHAPES` (1b, 3b, 8b, 70b, mistral-7b). The step and its
accounting are `jax_unlearn.plan`'s (``jax-unlearn plan`` compiles the same step for TPU and GPU
targets); this script keeps the XLA:CPU plans and their static collective count.
``--devices N`` is the mesh ``1,N,1`` (pure FSDP); the script starts with
``--xla_force_host_platform_device_count`` set to the mesh's size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="8b", help="a named shape (1b, 3b, 8b, 70b, mistral-7b) or a config.json")
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
    from jax_unlearn.plan import SHAPES, shape_config

    return shape_config(name) if name in SHAPES else ModelConfig.from_json_file(name)


def device_bytes(tree) -> int:
    """Bytes one device holds of the arrays of ``tree`` (``ShapeDtypeStruct``s with shardings)."""
    from jax_unlearn.plan import device_bytes as per_device

    return per_device(tree)


def run_overrides(*, objective, retain, reference, combiner, mesh, batch, seq, micro_batches, dtype, compute_dtype,
                  moment_dtype, scan, remat, logit_chunk, lora_rank, lora_targets, layer, attention=None) -> list[str]:
    """This script's options as the ``key=value`` overrides of a run config."""
    out = [f"objective.name={objective}", f"objective.retain={retain}", f"objective.reference={reference}",
           f"combiner.name={combiner}", f"mesh.data={mesh[0]}", f"mesh.fsdp={mesh[1]}", f"mesh.tensor={mesh[2]}",
           f"batch_size={batch}", f"micro_batches={micro_batches}", f"data.max_length={seq}", f"model.dtype={dtype}",
           f"model.compute_dtype={compute_dtype or 'null'}", f"optim.moment_dtype={moment_dtype or 'null'}",
           f"model.scan_layers={str(scan).lower()}", f"model.remat_policy={remat or 'null'}",
           f"objective.logit_chunk={logit_chunk or 'null'}", f"model.attention_impl={attention or 'null'}"]
    if objective == "rmu":
        out.append(f"objective.layer={layer}")
    if lora_rank is not None:
        out += [f"lora.rank={lora_rank}", f"lora.alpha={2.0 * lora_rank}", f"lora.targets=[{lora_targets}]"]
    return out


def plan(model_cfg, *, objective: str = "npo", retain: str = "nll", reference: str = "resident",
         combiner: str = "sago", mesh: tuple[int, int, int] = (1, 8, 1), batch: int = 8, seq: int = 512,
         micro_batches: int = 1, dtype: str = "bfloat16", compute_dtype: str | None = None,
         moment_dtype: str | None = None, scan: bool = True, remat: str | None = "full",
         logit_chunk: int | None = 128, lora_rank: int | None = None, lora_targets: str = "q_proj,v_proj",
         cpu_licm: bool = False, devices: list | None = None, mode: str = "combined",
         step_options: dict | None = None, attention: str | None = None) -> dict:
    """Compiles the run's step (`jax_unlearn.plan`: as `jax_unlearn.train.build_run` builds it) on
    abstract arrays and returns its per-device bytes (see the module doc). ``devices``: the mesh's
    devices (default this process's CPU devices; compile-only TPU/GPU devices of
    ``jax.experimental.topologies`` work); ``mode``: the step's mode (``"naive"``: one backward);
    ``step_options``: `jax_unlearn.step.StepConfig` fields no config key sets (``fuse_combine``)."""
    import jax

    from jax_unlearn import plan as pl
    from jax_unlearn import sharding as sh

    overrides = run_overrides(objective=objective, retain=retain, reference=reference, combiner=combiner, mesh=mesh,
                              batch=batch, seq=seq, micro_batches=micro_batches, dtype=dtype,
                              compute_dtype=compute_dtype, moment_dtype=moment_dtype, scan=scan, remat=remat,
                              logit_chunk=logit_chunk, lora_rank=lora_rank, lora_targets=lora_targets,
                              layer=min(7, model_cfg.num_hidden_layers - 1), attention=attention) + [f"mode={mode}"]
    cfg = pl.load_plan_config(None, overrides, shape="given")
    devices = list(devices) if devices is not None else jax.devices()[:math.prod(mesh)]
    run = pl.abstract_run(cfg, model_cfg, devices, step_options)
    compiled, compile_s, _ = pl.compile_step(run, devices[0].platform, cpu_licm)
    m = pl.step_memory(run, compiled)
    try:  # the TPU executable's text does not parse back (async-update instructions)
        moved = sh.collective_bytes(compiled.as_text(), run.state.params, run.mesh)
    except Exception:  # noqa: BLE001 - the memory numbers stand without the collective count
        moved = {"weights": 0, "activations": 0}
    return {
        "model_params": run.model_params,
        "trainable_params": int(sum(x.size for x in jax.tree.leaves(run.state.params))),
        "mesh": list(mesh), "devices": math.prod(mesh), "batch": batch, "seq": seq, "micro_batches": micro_batches,
        "objective": objective, "reference": reference if objective == "npo" else None, "retain": retain,
        "combiner": combiner, "dtype": dtype, "compute_dtype": compute_dtype, "moment_dtype": moment_dtype,
        "lora_rank": lora_rank, "lora_targets": lora_targets if lora_rank is not None else None,
        "scan": scan, "remat": remat, "logit_chunk": logit_chunk,
        "bytes": {
            "params": m.params,  # trainable parameters
            "frozen": m.frozen,  # the rest of the model (LoRA's base weights, RMU's other layers)
            "optimizer": m.optimizer,
            "reference": device_bytes(run.state.ref),
            "gradients": m.gradients,
            "arguments": m.arguments,
            "temp": m.temp,
            "activations_and_temp": m.activations,
            "peak": m.peak,
        },
        "collective_bytes": moved,
        "compile_s": round(compile_s, 1),
        "platform": f"{run.mesh.devices.flat[0].platform} x{run.mesh.size} (jax {jax.__version__})",
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
        os.environ["XLA_FLAGS"] = " ".join(flags).strip()
    r = plan(model_config(a.model), objective=a.objective, retain=a.retain, reference=a.reference,
             combiner=a.combiner, mesh=mesh_shape(a), batch=a.batch, seq=a.seq, micro_batches=a.micro_batches,
             dtype=a.dtype, compute_dtype=a.compute_dtype, moment_dtype=a.moment_dtype, scan=not a.no_scan,
             remat=a.remat or None, logit_chunk=a.logit_chunk or None, lora_rank=a.lora_rank,
             lora_targets=a.lora_targets, cpu_licm=a.cpu_licm)
    r["model"] = a.model
    print(report(r))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
