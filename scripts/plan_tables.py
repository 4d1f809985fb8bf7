"""The tables of docs/benchmarks.md from the TPU and GPU compilers (`jax_unlearn.plan`), row by row.

Each row compiles one run's step for one target (no hardware, nothing allocated) and is printed
as soon as it is done, with its compile time, and appended as JSON to ``--out``; large models
take minutes per row, so the rows run smallest first and a run that stops early keeps what
finished. Every run: bfloat16 parameters and moments, ``model.scan_layers=true``,
``model.remat_policy=full``, ``objective.logit_chunk=128``, rows of 512 tokens, one row per chip
per task (at least 8).

    python scripts/plan_tables.py pods --out pods.jsonl               # 1b/8b/70b x v5p-8..v5e-256 x setups
    python scripts/plan_tables.py ratios --out ratios.jsonl           # naive / weighted_sum / pcgrad / sago
    python scripts/plan_tables.py ratios --targets h100 --out ratios.jsonl
    python scripts/plan_tables.py table pods.jsonl ratios.jsonl       # Markdown of what finished
    python scripts/plan_tables.py pods --shapes 1b --targets v5p-8 --setups full   # a subset
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

TARGETS = {"v5p-8": "tpu:v5p:2x2x2", "v5p-64": "tpu:v5p:4x4x4", "v5p-256": "tpu:v5p:4x8x8", "v6e-64": "tpu:v6e:8x8",
           "v5e-256": "tpu:v5e:16x16", "h100": "gpu:h100", "h200": "gpu:h200"}
CHIPS = {"v5p-8": 8, "v5p-64": 64, "v5p-256": 256, "v6e-64": 64, "v5e-256": 256, "h100": 1, "h200": 1}
COMMON = ["model.dtype=bfloat16", "model.scan_layers=true", "model.remat_policy=full", "objective.logit_chunk=128",
          "data.max_length=512", "max_steps=100"]
SETUPS = {
    "full": ["objective.name=grad_diff", "combiner.name=sago"],
    "lora": ["objective.name=grad_diff", "combiner.name=sago", "lora.rank=16", "lora.targets=[all-linear]"],
    "npo-resident": ["objective.name=npo", "objective.reference=resident", "combiner.name=sago"],
    "npo-precompute": ["objective.name=npo", "objective.reference=precompute", "combiner.name=sago"],
}
# issue 27's rows: (target, shape, objective overrides, batch per task)
RATIO_ROWS = [
    ("h100", "1b", ["objective.name=grad_diff"], 8),
    ("h200", "8b", ["objective.name=npo", "objective.reference=precompute"], 8),
    ("v5p-8", "8b", ["objective.name=npo", "objective.reference=resident"], 8),
    ("v5p-64", "8b", ["objective.name=npo", "objective.reference=resident"], 64),  # issue 22's pod ratio
]
COMBINERS = [("naive", ["mode=naive", "combiner.name=weighted_sum"]), ("sago", ["combiner.name=sago"]),
             ("weighted_sum", ["combiner.name=weighted_sum"]), ("pcgrad", ["combiner.name=pcgrad"])]


def one(label: dict, target: str, shape: str, overrides: list[str], out: str | None) -> dict | None:
    from jax_unlearn import plan

    t0 = time.perf_counter()
    try:
        cfg = plan.load_plan_config(None, COMMON + overrides, shape=shape)
        p = plan.plan_run(cfg, plan.parse_target(TARGETS[target]), shape)
    except Exception as err:  # noqa: BLE001 - a row that cannot compile is reported, the next one runs
        print(f"{label}: FAILED after {time.perf_counter() - t0:.0f} s: {type(err).__name__}: {str(err)[:300]}",
              flush=True)
        return None
    row = dict(plan.plan_dict(p), **label, wall_s=round(time.perf_counter() - t0, 1))  # label["combiner"]: its name
    b = row["bytes"]
    print(f"{label}: peak {b['peak'] / 2**30:.2f} GiB/chip of {row['chip_memory'] / 2**30:.0f} "
          f"({'fits' if row['fits'] else 'DOES NOT FIT'}); compiled in {row['compile_s']} s", flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def pods(a: argparse.Namespace) -> None:
    for shape in a.shapes:
        for target in a.targets:
            for setup in a.setups:
                batch = max(8, CHIPS[target])
                one({"table": "pods", "shape": shape, "pod": target, "setup": setup}, target, shape,
                    SETUPS[setup] + [f"batch_size={batch}"], a.out)


def ratios(a: argparse.Namespace) -> None:
    for target, shape, objective, batch in RATIO_ROWS:
        if a.targets and target not in a.targets:
            continue
        for name, extra in COMBINERS:
            one({"table": "ratios", "shape": shape, "pod": target, "setup": "+".join(objective), "combiner": name},
                target, shape, objective + extra + [f"batch_size={batch}"], a.out)


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def table(paths: list[str]) -> None:
    rows = [json.loads(line) for p in paths for line in open(p) if line.strip()]
    pod_rows = [r for r in rows if r["table"] == "pods"]
    if pod_rows:
        print("| model | pod (chips) | setup | batch | params | frozen | optimizer | reference | 2 grads | act. + temp "
              "| **peak** | chip | fits | est. ms/step | compile s |")
        print("|" + "---|" * 15)
        for r in pod_rows:
            b, c = r["bytes"], r["cost_estimate"]
            ms = f"{c['seconds'] * 1e3:.0f}" if c["seconds"] else "-"
            print(f"| {r['shape']} | {r['pod']} ({r['devices']}) | {r['setup']} | {r['batch_size']}x{r['seq']} | "
                  + " | ".join(gib(b[k]) for k in ("params", "frozen", "optimizer", "reference", "gradients",
                                                  "activations"))
                  + f" | **{gib(b['peak'])}** | {gib(r['chip_memory'])} | {'yes' if r['fits'] else 'NO'} | {ms} | "
                    f"{r['compile_s']} |")
    ratio_rows = [r for r in rows if r["table"] == "ratios"]
    if ratio_rows:
        print("\n| target | model, objective | combiner | peak GiB | / naive | compile s |")
        print("|---|---|---|---|---|---|")
        naive = {(r["pod"], r["shape"], r["setup"]): r["bytes"]["peak"] for r in ratio_rows if r["combiner"] == "naive"}
        for r in ratio_rows:
            base = naive.get((r["pod"], r["shape"], r["setup"]))
            ratio = f"{r['bytes']['peak'] / base:.3f}" if base else "-"
            setup = r["setup"].replace("objective.name=", "").replace("objective.reference=", "")
            print(f"| {r['pod']} ({r['devices']}) | {r['shape']}, {setup} | {r['combiner']} | {gib(r['bytes']['peak'])} | {ratio} | "
                  f"{r['compile_s']} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("pods")
    p.add_argument("--shapes", nargs="+", default=["1b", "8b", "70b"])
    p.add_argument("--targets", nargs="+", default=["v5p-8", "v5p-64", "v5p-256", "v6e-64", "v5e-256"])
    p.add_argument("--setups", nargs="+", default=list(SETUPS))
    p.add_argument("--out")
    p = sub.add_parser("ratios")
    p.add_argument("--targets", nargs="+", help="only these rows' targets (h100, h200, v5p-8, v5p-64)")
    p.add_argument("--out")
    p = sub.add_parser("table")
    p.add_argument("paths", nargs="+")
    a = ap.parse_args(argv)
    if a.what == "table":
        table(a.paths)
    else:
        {"pods": pods, "ratios": ratios}[a.what](a)


if __name__ == "__main__":
    sys.exit(main())
