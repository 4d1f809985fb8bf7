"""Peak memory of the two-gradient step against the one-backward (naive) step, from a GPU or TPU
compiler on this CPU machine (compiler-measured, not a run).

    python scripts/memory_ratio.py --target gpu:SPEC.txtpb --model 1b --objective grad_diff \\
        --combiners naive sago pcgrad weighted_sum [--fuse] [--json out.jsonl]
    python scripts/memory_ratio.py --target tpu:v5p:2x2x2 --model 8b --objective npo --reference precompute

``gpu:FILE`` is a ``stream_executor.GpuTargetConfigProto`` text (XLA's
``xla/backends/gpu/target_config/specs/h100_sxm.txtpb``), compiled for one device with the CUDA
plugin (``pip install jax-cuda12-pjrt==$JAXLIB jax-cuda12-plugin==$JAXLIB``, no CUDA libraries
needed); ``tpu:TOPOLOGY`` uses libtpu's compile-only devices. Each combiner's step is
`scripts/plan_memory.plan` on those devices (FSDP over all of them); ``naive`` is
``StepConfig(mode="naive")``, one backward of ``gamma*L_f + alpha*L_r``. ``--fuse`` sets
``StepConfig(fuse_combine=True)``, ``--chunk-head`` ``StepConfig(chunk_head=True)``,
``--sequence-tasks`` ``StepConfig(sequence_tasks=True)``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def devices(target: str) -> list:
    from jax.experimental import topologies

    kind, _, rest = target.partition(":")
    if kind == "gpu":
        with open(rest) as f:
            spec = f.read()
        return list(topologies.get_topology_desc(topology_name="gpu", platform="cuda", target_config=spec,
                                                 topology="1x1x1").devices)
    if kind == "tpu":
        return list(topologies.get_topology_desc(platform="tpu", topology_name=rest).devices)
    raise SystemExit(f"--target must be gpu:SPEC_FILE or tpu:TOPOLOGY, got {target!r}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True)
    ap.add_argument("--model", default="1b")
    ap.add_argument("--objective", default="grad_diff")
    ap.add_argument("--reference", default="resident", choices=["resident", "precompute"])
    ap.add_argument("--combiners", nargs="+", default=["naive", "sago", "pcgrad", "weighted_sum"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--remat", default="full", help="'' for none")
    ap.add_argument("--moment-dtype", default=None)
    ap.add_argument("--attention", default=None, choices=["xla", "cudnn"],
                    help="model.attention_impl (cudnn: needs cuDNN on this machine, pip install nvidia-cudnn-cu12)")
    ap.add_argument("--fuse", action="store_true")
    ap.add_argument("--chunk-head", action="store_true")
    ap.add_argument("--sequence-tasks", action="store_true", help="StepConfig(sequence_tasks=True)")
    ap.add_argument("--unscanned", action="store_true", help="model.scan_layers=false")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only devices; no CUDA/TPU runtime is needed
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import plan_memory as pm

    devs = devices(a.target)
    rows = []
    for name in a.combiners:
        mode = "naive" if name == "naive" else "combined"
        r = pm.plan(pm.model_config(a.model), objective=a.objective, reference=a.reference,
                    combiner="weighted_sum" if name == "naive" else name, mesh=(1, len(devs), 1), devices=devs,
                    batch=a.batch, seq=a.seq, remat=a.remat or None, moment_dtype=a.moment_dtype, mode=mode,
                    attention=a.attention,
                    step_options={"fuse_combine": a.fuse and mode == "combined",
                                  "chunk_head": a.chunk_head and mode == "combined",
                                  "sequence_tasks": a.sequence_tasks and mode == "combined"},
                    scan=not a.unscanned)
        r.update(model=a.model, target=a.target, step=name, attention=a.attention, fuse_combine=a.fuse and mode == "combined",
                 chunk_head=a.chunk_head and mode == "combined", sequence_tasks=a.sequence_tasks and mode == "combined")
        rows.append(r)
        print(f"{name:14s} peak {r['bytes']['peak'] / 2**30:7.2f} GiB per device (compiled in {r['compile_s']} s)",
              flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(r) + "\n")
    base = next((r for r in rows if r["step"] == "naive"), None)
    if base is not None:
        for r in rows:
            print(f"{r['step']:14s} / naive = {r['bytes']['peak'] / base['bytes']['peak']:.3f}")


if __name__ == "__main__":
    main()
