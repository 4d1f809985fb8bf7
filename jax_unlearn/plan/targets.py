"""Compile targets: ``tpu:CHIP:TOPOLOGY``, ``gpu:h100[:N]`` / ``gpu:h200[:N]`` / ``gpu:FILE[:N]``, ``cpu:N``.

A target is a list of devices the compiler can compile for without the hardware (JAX's
compile-only devices, `jax.experimental.topologies.get_topology_desc`) plus the chip's facts:
its memory and the published peaks the roofline estimate uses (`CHIPS`, each with its source).

- TPU: ``tpu:v5p:2x2x2`` (8 chips), ``tpu:v5e:16x16``, ``tpu:v6e:8x8``, ``tpu:v4:2x2x1``: the
  TPU compiler of ``libtpu`` (``pip install 'jax-unlearn[plan]'``).
- NVIDIA: ``gpu:h100`` (one H100 SXM), ``gpu:h200:8`` (eight H200), ``gpu:my_gpu.txtpb[:N]``:
  XLA's GPU compiler of the CUDA plugin (same extra; no CUDA library and no GPU needed) given a
  ``stream_executor.GpuTargetConfigProto`` text; the H100 and H200 ones ship in ``gpu_specs/``.
- ``cpu:N``: N XLA:CPU host devices of this process (the CLI asks JAX for them before it starts).
"""

from __future__ import annotations

import dataclasses
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

from jax_unlearn.config import ConfigError

GIB = 2**30
EXTRA = "pip install 'jax-unlearn[plan]'"


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator's facts: memory in bytes, dense bfloat16 peak FLOP/s and HBM bytes/s
    (``None`` when not published / not known), and where they come from."""

    name: str
    memory: int
    peak_flops: float | None
    hbm_bandwidth: float | None
    source: str


_TPU_DOCS = "cloud.google.com/tpu/docs/"
CHIPS: dict[str, Chip] = {
    "v5p": Chip("TPU v5p", 95 * GIB, 459e12, 2.765e12, _TPU_DOCS + "v5p (95 GiB HBM2e, 459 TFLOP/s bf16, 2,765 GB/s)"),
    "v5e": Chip("TPU v5e", 16 * GIB, 197e12, 0.819e12, _TPU_DOCS + "v5e (16 GiB HBM2, 197 TFLOP/s bf16, 819 GB/s)"),
    "v6e": Chip("TPU v6e", 32 * GIB, 918e12, 1.64e12, _TPU_DOCS + "v6e (32 GiB HBM, 918 TFLOP/s bf16, 1,640 GB/s)"),
    "v4": Chip("TPU v4", 32 * GIB, 275e12, 1.2e12, _TPU_DOCS + "v4 (32 GiB HBM2, 275 TFLOP/s bf16, 1,200 GB/s)"),
    # memory: the spec's device_memory_size (what the driver reports); peaks: NVIDIA's datasheets
    "h100": Chip("NVIDIA H100 SXM", 84942979072, 989e12, 3.35e12,
                 "gpu_specs/h100_sxm.txtpb (XLA's spec: 84,942,979,072 B); NVIDIA H100 datasheet "
                 "(SXM: 989 TFLOP/s dense bf16, 3.35 TB/s)"),
    "h200": Chip("NVIDIA H200", 151397597184, 989e12, 4.8e12,
                 "gpu_specs/h200.txtpb (XLA's spec: 151,397,597,184 B); NVIDIA H200 datasheet "
                 "(SXM: 989 TFLOP/s dense bf16, 4.8 TB/s)"),
}
TPU_CHIPS = ("v4", "v5e", "v5p", "v6e")
GPU_SPECS = {"h100": "h100_sxm.txtpb", "h200": "h200.txtpb"}
_TOPOLOGY = re.compile(r"\d+(x\d+){1,2}")


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """A parsed ``--target``: ``platform`` (tpu, gpu, cpu), the chip's facts, and what selects the
    devices (``topology`` for a TPU, ``count`` and ``spec_text`` for a GPU, ``count`` for CPU)."""

    text: str
    platform: str
    chip: Chip
    topology: str | None = None
    count: int = 1
    spec_text: str | None = dataclasses.field(default=None, repr=False)

    def with_memory(self, memory: int) -> TargetSpec:
        """The same target with another per-device memory (bytes), e.g. for a what-if."""
        return dataclasses.replace(self, chip=dataclasses.replace(self.chip, memory=int(memory)))


def _usage(text: str, why: str) -> ConfigError:
    return ConfigError(f"--target {text!r}: {why}; expected tpu:CHIP:TOPOLOGY (CHIP one of {', '.join(TPU_CHIPS)}, "
                       "e.g. tpu:v5p:2x2x2), gpu:h100[:N], gpu:h200[:N], gpu:SPEC.txtpb[:N] or cpu:N")


def _count(text: str, value: str, what: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise _usage(text, f"{what} {value!r} is not an integer >= 1")
    return int(value)


def spec_fields(spec_text: str) -> dict[str, str]:
    """The scalar ``name: value`` fields of a GpuTargetConfigProto text (nested ones included)."""
    return dict(re.findall(r"^\s*(\w+):\s*\"?([^\"\n]*)\"?\s*$", spec_text, flags=re.M))


def _gpu_chip(text: str, spec_text: str, where: str) -> Chip:
    f = spec_fields(spec_text)
    if "device_memory_size" not in f:
        raise _usage(text, f"{where} has no gpu_device_info.device_memory_size (not a GpuTargetConfigProto text)")
    bandwidth = float(f["memory_bandwidth"]) if "memory_bandwidth" in f else None
    return Chip(f.get("name", Path(where).stem), int(f["device_memory_size"]), None, bandwidth,
                f"{where} (no published bf16 peak: no time estimate)")


def parse_target(text: str) -> TargetSpec:
    """``--target`` text -> `TargetSpec`; raises `ConfigError` naming what is wrong (nothing is
    imported or compiled here)."""
    kind, _, rest = text.partition(":")
    if kind == "cpu":
        return TargetSpec(text, "cpu", _cpu_chip(_count(text, rest, "the device count")), count=int(rest))
    if kind == "tpu":
        chip, _, topology = rest.partition(":")
        if chip not in TPU_CHIPS:
            raise _usage(text, f"unknown TPU chip {chip!r}")
        if not _TOPOLOGY.fullmatch(topology):
            raise _usage(text, f"topology {topology!r} is not of the form AxB or AxBxC (e.g. 2x2x2, 16x16)")
        return TargetSpec(text, "tpu", CHIPS[chip], topology=f"{chip}:{topology}")
    if kind == "gpu":
        name, count = rest, 1
        head, sep, tail = rest.rpartition(":")
        if sep and tail.isdigit():
            name, count = head, _count(text, tail, "the GPU count")
        if name in GPU_SPECS:
            spec = resources.files("jax_unlearn.plan").joinpath("gpu_specs", GPU_SPECS[name]).read_text()
            return TargetSpec(text, "gpu", CHIPS[name], count=count, spec_text=spec)
        path = Path(name)
        if not path.is_file():
            raise _usage(text, f"{name!r} is neither a known GPU ({', '.join(GPU_SPECS)}) nor a spec file")
        spec = path.read_text()
        return TargetSpec(text, "gpu", _gpu_chip(text, spec, str(path)), count=count, spec_text=spec)
    raise _usage(text, f"unknown platform {kind!r}")


def _cpu_chip(n: int) -> Chip:
    """XLA:CPU devices share this machine's memory: each gets 1/N of it."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not every system reports it
        total = 0
    return Chip(f"XLA:CPU host device (1/{n} of this machine)", total // n, None, None,
                "os.sysconf(SC_PHYS_PAGES) / N")


def request_cpu_devices(n: int) -> None:
    """Asks JAX for ``n`` host devices (before its CPU backend starts; later it has no effect
    and `target_devices` says how many there are)."""
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # the backend already started: keep what it has
        pass


def compile_only() -> None:
    """Keeps JAX on its CPU backend (unless ``JAX_PLATFORMS`` says otherwise): planning compiles
    for compile-only devices and runs nothing, and the CUDA plugin of the ``plan`` extra would
    otherwise try to start CUDA and log an error on a machine without it."""
    import jax

    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")


def _missing_extra(target: TargetSpec, err: BaseException) -> ConfigError:
    what = "libtpu (the TPU compiler)" if target.platform == "tpu" else "the CUDA plugin (XLA's GPU compiler)"
    return ConfigError(f"--target {target.text} needs {what}, which is not installed or does not load "
                       f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); {EXTRA}")


def target_devices(target: TargetSpec) -> list[Any]:
    """The target's devices (compile-only for TPU and GPU). Raises `ConfigError` when the compiler
    is not installed (naming the extra) or the topology does not resolve."""
    import jax

    if target.platform == "cpu":
        devices = jax.devices("cpu")
        if len(devices) < target.count:
            raise ConfigError(f"--target {target.text}: this process has {len(devices)} CPU devices; start it with "
                              f"XLA_FLAGS=--xla_force_host_platform_device_count={target.count} (the CLI does)")
        return devices[:target.count]
    from jax.experimental import topologies

    try:
        if target.platform == "tpu":
            import libtpu  # noqa: F401 - the TPU compiler; its absence is the common failure

            # compile-only: no TPU to own, so several processes may load libtpu at once (else the
            # second one fails on /tmp/libtpu_lockfile), and no cloud metadata server to ask
            os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
            os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

            return list(topologies.get_topology_desc(platform="tpu", topology_name=target.topology).devices)
        import jax_plugins.xla_cuda12  # noqa: F401 - the CUDA plugin

        return list(topologies.get_topology_desc(topology_name=target.chip.name, platform="cuda",
                                                 target_config=target.spec_text,
                                                 topology=f"1x1x{target.count}").devices)
    except ImportError as err:
        raise _missing_extra(target, err) from None
    except (RuntimeError, ValueError, NotImplementedError) as err:
        if "Unknown backend" in str(err) or "not found" in str(err).lower():
            raise _missing_extra(target, err) from None
        raise ConfigError(f"--target {target.text}: the compiler refused it: {str(err).splitlines()[0][:300]}") from None
