"""Safetensors files, one tensor at a time: the reading and writing that `hf_io` (model folders)
and `lora` (PEFT adapter folders) both build on.

- `read_header` / `header_shapes`: a file's tensor entries, checked complete before any data is read;
- `check_tensors`: expected names and shapes against what the files hold, errors naming the tensor;
- `read_into`: copy one tensor into a host buffer in chunks (the file mapping closed after each);
- `aligned_empty` / `to_device`: host buffers XLA adopts without a copy, placed by a sharding;
- `write_folder`: fill a temporary sibling folder and rename it into place (a failed write
  never destroys existing output).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

try:  # safetensors is an optional dependency (extra "hf"); the model itself does not need it
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import save_file
except ImportError:  # pragma: no cover - exercised only without the extra
    safe_open = save_file = None
    SafetensorError = OSError


class CheckpointError(ValueError):
    """A checkpoint folder does not match the model its ``config.json`` describes."""


def require_safetensors() -> None:
    """Raises ImportError naming the extra when ``safetensors`` is not installed."""
    if safe_open is None:  # pragma: no cover
        raise ImportError("reading and writing Hugging Face checkpoints needs the 'safetensors' "
                          "package: pip install 'jax-unlearn[hf]'")


def read_header(file: Path) -> dict[str, dict[str, Any]]:
    """The tensor entries of a safetensors file's JSON header (name -> ``dtype``, ``shape``,
    ``data_offsets``), after checking that the file holds every byte the header describes, so a
    truncated copy is named before any tensor is read. Raises `CheckpointError` naming the file."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or n > size - 8:
            raise CheckpointError(f"{file}: truncated or not a safetensors file ({size} bytes; the header length "
                                  f"field says {max(n, 0)} bytes of header follow)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file}: damaged safetensors header (not JSON: {err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: damaged safetensors header (not a JSON object)")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = 0
    for name, info in tensors.items():
        try:
            info["shape"] = tuple(int(d) for d in info["shape"])
            begin, stop = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: damaged safetensors header: the entry of tensor {name} has no valid "
                                  "'shape' and 'data_offsets'") from None
        end = max(end, stop)
    have = size - 8 - n
    if end > have:
        raise CheckpointError(f"{file}: truncated: its header describes {end} bytes of tensor data but the file "
                              f"holds {have}; copy the checkpoint again")
    return tensors




def header_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(set(files.values())):
        for name, info in read_header(file).items():
            if files.get(name) == file:
                shapes[name] = info["shape"]
    return shapes




CHUNK_BYTES = 16 * 2**20


def read_into(file: Path, name: str, out: np.ndarray) -> None:
    """Copy tensor ``name`` of ``file`` into ``out`` (HF shape; cast on assignment).

    Reads at most ``CHUNK_BYTES`` of rows per opening and closes the file mapping after each
    chunk: pages of a live ``mmap`` count toward the resident set, so reading a whole tensor
    through one mapping would briefly hold it twice.
    """
    rows = out.shape[0] if out.ndim else 1
    row_bytes = max(1, out[0].nbytes if out.ndim else out.nbytes)
    step = max(1, CHUNK_BYTES // row_bytes)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        with safe_open(file, framework="numpy") as f:
            sl = f.get_slice(name)
            try:
                chunk = sl[start:stop] if out.ndim else sl[:]
            except TypeError:  # safetensors builds whose numpy backend lacks bfloat16
                chunk = None
        if chunk is None:
            with safe_open(file, framework="flax") as f:
                chunk = np.asarray(f.get_slice(name)[start:stop] if out.ndim else f.get_tensor(name))
        dst = out[start:stop] if out.ndim else out[...]
        if chunk.dtype == dst.dtype and chunk.dtype.itemsize in (1, 2, 4, 8):  # plain memcpy
            bits = np.dtype(f"u{chunk.dtype.itemsize}")
            dst.view(bits)[...] = chunk.view(bits)
        else:  # cast (e.g. bfloat16 file -> float32 parameters)
            dst[...] = chunk
        del chunk




def aligned_empty(shape: tuple[int, ...], dtype: Any, align: int = 64) -> np.ndarray:
    """``np.empty`` whose data pointer is ``align``-byte aligned (XLA adopts such buffers as is)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)




def to_device(host: np.ndarray, sharding) -> jax.Array:
    """Place a host array; on a single CPU device the buffer is adopted without a copy.

    With a sharding each addressable shard is cut from ``host`` (``make_array_from_callback``
    also works when the mesh spans several processes: each one fills its own devices).
    """
    if sharding is not None:
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    if jax.default_backend() == "cpu":
        try:
            return jnp.from_dlpack(host)
        except Exception:  # pragma: no cover - alignment or dlpack limits: fall back to a copy
            pass
    return jax.device_put(host)


def check_tensors(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]],
                  files: dict[str, Path], folder: Path, ignore: Callable[[str], bool] = lambda name: False) -> None:
    """Raises `CheckpointError` naming the folder, file and tensor when ``found`` (name -> shape,
    from the headers of ``files``) misses a tensor of ``expected``, holds one it does not expect
    (unless ``ignore(name)``), or holds one in another shape."""
    missing = [n for n in expected if n not in found]
    if missing:
        listed = ", ".join(f"{n} (expected shape {expected[n]})" for n in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{folder}: missing tensor(s) {listed}{more}")
    unexpected = [n for n in found if n not in expected and not ignore(n)]
    if unexpected:
        listed = ", ".join(f"{n} (found shape {found[n]} in {files[n].name})" for n in unexpected[:5])
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{folder}: unexpected tensor(s) {listed}{more}")
    for n, shape in expected.items():
        if found[n] != shape:
            raise CheckpointError(f"{folder}: tensor {n} in {files[n].name} has shape {found[n]}, expected {shape}")


# ----------------------------------------------------------------------------- writing


def write_folder(path: str | Path, fill: Callable[[Path], None], *, overwrite: bool = False,
                 what: str = "export") -> Path:
    """Create folder ``path`` atomically: ``fill(tmp)`` writes into a temporary sibling folder that
    is then renamed into place, so a failed write never destroys existing output. The folder and
    its files get the usual permissions (``0777`` / ``0666`` less the umask).

    Raises:
      FileExistsError: ``path`` is a non-empty folder (or a file) and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{what} path {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{what} folder {path} is not empty; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 0700 would stay on the renamed folder
    backup = None
    try:
        fill(tmp)
        for file in tmp.rglob("*"):  # some writers (safetensors) create their files 0600
            os.chmod(file, (0o777 if file.is_dir() else 0o666) & ~umask())
        if path.exists():
            backup = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            path.rename(backup)
        tmp.rename(path)
    except BaseException:
        if backup is not None and not path.exists():
            backup.rename(path)
            backup = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    return path


def umask() -> int:
    """The process's file-mode creation mask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
