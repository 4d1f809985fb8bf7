"""``jax-unlearn plan``: a run's step compiled for a TPU pod, NVIDIA GPUs or host devices from
this machine, without the hardware and without allocating anything.

    from jax_unlearn import plan
    cfg = plan.load_plan_config("configs/wmdp/graddiff_sago_bio.yaml", ["model.scan_layers=true"], shape="mistral-7b")
    p = plan.plan_run(cfg, plan.parse_target("tpu:v5p:2x2x2"), shape="mistral-7b")
    print(plan.format_plan(p))

- `targets`: ``--target`` parsing, the chips' memory and published peaks, compile-only devices.
- `shapes`: named model shapes (``--shape``).
- `memory`: the run's step on abstract arrays (as `jax_unlearn.train.build_run` builds it),
  compiled; per-device bytes (`StepMemory`).
- `cost`: the compiler's FLOPs / bytes accessed -> a roofline ESTIMATE; the combiner's traffic.
- `search`: the largest batch that fits (doubling, then bisection).
- `planner`: `plan_run` -> `Plan`; `report`: its table and JSON.
"""

from .cost import CombinerTraffic, StepCost, combiner_traffic, roofline, step_cost
from .memory import AbstractRun, StepMemory, abstract_run, compile_step, device_bytes, step_memory
from .planner import Besides, Plan, load_plan_config, plan_run
from .report import format_plan, plan_dict
from .search import largest_fitting
from .shapes import SHAPES, shape_config
from .targets import CHIPS, Chip, TargetSpec, compile_only, parse_target, request_cpu_devices, target_devices

__all__ = [
    "CHIPS", "SHAPES", "AbstractRun", "Besides", "Chip", "CombinerTraffic", "Plan", "StepCost", "StepMemory",
    "TargetSpec", "abstract_run", "combiner_traffic", "compile_only", "compile_step", "device_bytes", "format_plan",
    "largest_fitting", "load_plan_config", "parse_target", "plan_dict", "plan_run", "request_cpu_devices",
    "roofline", "shape_config", "step_cost", "step_memory", "target_devices",
]
