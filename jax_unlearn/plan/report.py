"""A `Plan` as text (the ``jax-unlearn plan`` table) and as a JSON-ready dict."""

from __future__ import annotations

import dataclasses

from .planner import Plan
from .targets import GIB


def gib(n: float) -> str:
    return f"{n / GIB:9.2f} GiB"


def format_plan(p: Plan) -> str:
    """The per-device table, the verdict, the time ESTIMATE and what the run holds besides the step."""
    m, chip = p.memory, p.target.chip
    lines = [f"{p.model}: {p.model_params / 1e9:.3f}B parameters ({p.trainable_params / 1e9:.3f}B trainable); "
             f"batch {p.batch_size}x{p.seq} per task, {p.micro_batches} micro-batch(es)",
             f"target {p.target.text}: {p.devices} x {chip.name}, mesh data x fsdp x tensor = "
             f"{' x '.join(map(str, p.mesh))}; compiled in {p.compile_s} s",
             "per device:"]
    rows = [("parameters (trainable)", m.params), ("frozen weights", m.frozen), ("optimizer state", m.optimizer),
            ("reference", m.reference), ("batches", m.batches),
            ("gradients (in temporaries)", m.gradients), ("activations + other temporaries", m.activations),
            ("peak", m.peak), ("chip memory", chip.memory)]
    lines += [f"  {k:<34s}{gib(v)}" for k, v in rows]
    verdict = "FITS" if p.fits else "DOES NOT FIT"
    head = chip.memory - m.peak
    lines.append(f"verdict: {verdict} ({gib(abs(head)).strip()} {'free' if head >= 0 else 'over'} per device)")
    if p.largest_batch is not None:
        lines.append(f"largest batch that fits: {p.largest_batch} rows per batch shard"
                     + (f" (batch_size={p.largest_batch * _shards(p)})"
                        if p.largest_batch else " (none: even the smallest batch does not fit)"))
    if p.naive_peak is not None:
        lines.append(f"one-backward (naive) step, same shape, micro_batches=1: peak {gib(p.naive_peak).strip()}; "
                     f"this step / naive = {m.peak / p.naive_peak:.3f}")
    c = p.cost
    flops = {"compiler": "the compiler's count", "textbook": "the textbook count (2+4 N T, +2 N T remat; the "
             "compiler counts a scan's body once)"}[c.flops_from]
    counted = "" if c.counted else " (this executable reports no cost analysis: bytes unknown, compute term only)"
    if c.seconds is not None:
        lines.append(f"ESTIMATE, not a measurement: roofline at {chip.name}'s published peaks{counted}: "
                     f"{c.flops / 1e12:.2f} TFLOP ({flops}) and {c.bytes_accessed / GIB:.2f} GiB accessed per device "
                     f"-> {c.seconds * 1e3:.1f} ms per step ({c.bound}-bound), "
                     f"{c.tokens_per_s_per_chip:,.0f} tokens/s per chip")
    else:
        why = "the compiler counted nothing" if chip.peak_flops else f"no published peak for {chip.name}"
        lines.append(f"compiler's count: {c.flops / 1e12:.3f} TFLOP and {c.bytes_accessed / GIB:.3f} GiB accessed "
                     f"per device ({why}: no time estimate)")
    for t in p.combiner:
        what = (f"{t.bytes_accessed / GIB:.3f} GiB accessed per device, {t.ratio:.2f} x" if t.ratio is not None else
                "no cost analysis from this executable; the")
        lines.append(f"combiner {t.name} ({'with' if t.diagnostics else 'without'} diagnostics): {what} the floor "
                     f"{t.floor / GIB:.3f} GiB (read 2 gradients, write 1 update)")
    lines += [f"note: {n}" for n in p.notes]
    lines.append("besides the step's arguments the run holds on the devices: "
                 + ("nothing" if not sum(b.device_bytes for b in p.besides) else
                    gib(sum(b.device_bytes for b in p.besides)).strip()))
    lines += [f"  {b.what} ({b.where}): {b.note}" for b in p.besides]
    return "\n".join(lines)


def _shards(p: Plan) -> int:
    """Devices that split the batch rows (data x fsdp)."""
    return p.devices // p.mesh[2]


def plan_dict(p: Plan) -> dict:
    """The plan as JSON-ready values (bytes per device)."""
    out = {"target": p.target.text, "chip": p.target.chip.name, "chip_memory": p.target.chip.memory,
           "model": p.model, "devices": p.devices, "mesh": list(p.mesh), "model_params": p.model_params,
           "trainable_params": p.trainable_params, "batch_size": p.batch_size, "seq": p.seq,
           "micro_batches": p.micro_batches, "compile_s": p.compile_s, "fits": p.fits,
           "bytes": dict(dataclasses.asdict(p.memory), activations=p.memory.activations, peak=p.memory.peak),
           "cost_estimate": dataclasses.asdict(p.cost), "naive_peak": p.naive_peak,
           "largest_batch_per_shard": p.largest_batch,
           "search_probes": [{"rows_per_shard": r, "peak": b} for r, b in p.probes], "notes": list(p.notes),
           "combiner": [dict(dataclasses.asdict(t), ratio=t.ratio) for t in p.combiner],
           "besides_step": [dataclasses.asdict(b) for b in p.besides]}
    return out
