"""Hugging Face checkpoint import/export (``config.json`` + safetensors), one tensor at a time.

`load_hf` builds the model abstractly (``nnx.eval_shape``: no random init, no memory), checks
every tensor's name and shape against the safetensors headers *before* reading any data, then
reads, casts and places one tensor at a time, closing each file mapping straight after so
mapped pages do not pile up in the resident set. Pickle checkpoints are refused unread.

`save_hf` writes into a temporary sibling folder and renames it into place, so a failed save
never destroys existing output.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import lora
from . import safetensors_io as st_io
from .config import ModelConfig, ModelOptions
from .llama import CausalLM
from .partitioning import ShardingSpec, host_value, logical_axes, sharding_fn
from .safetensors_io import CheckpointError, write_folder

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Buffers some older exports carry; transformers ignores them too.
_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


# ----------------------------------------------------------------------------- name mapping
def hf_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a HF checkpoint of ``cfg`` holds, with its shape (HF ``[out, in]`` layout)."""
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    NH, KH = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (V, D)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                p + "self_attn.q_proj.weight": (NH, D), p + "self_attn.k_proj.weight": (KH, D),
                p + "self_attn.v_proj.weight": (KH, D), p + "self_attn.o_proj.weight": (D, NH),
                p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                p + "mlp.down_proj.weight": (D, F)}
        if cfg.attention_bias:
            out |= {p + "self_attn.q_proj.bias": (NH,), p + "self_attn.k_proj.bias": (KH,),
                    p + "self_attn.v_proj.bias": (KH,), p + "self_attn.o_proj.bias": (D,)}
        if cfg.mlp_bias:
            out |= {p + "mlp.gate_proj.bias": (F,), p + "mlp.up_proj.bias": (F,), p + "mlp.down_proj.bias": (D,)}
    return out


def _suffix(parts: tuple) -> str:
    *head, last = (str(p) for p in parts)
    if last.endswith("_proj"):
        last += ".weight"
    elif last.endswith("_bias"):
        last = last[: -len("_bias")] + "_proj.bias"
    return ".".join([*head, last])


def _param_table(state: nnx.State, cfg: ModelConfig, scanned: bool):
    """Yield ``(path, variable, [hf names])``; a stacked parameter lists one name per layer."""
    for path, var in nnx.to_flat_state(state):
        if path[0] == "embed_tokens":
            yield path, var, ["model.embed_tokens.weight"]
        elif path[0] == "lm_head":
            yield path, var, ["lm_head.weight"]
        elif path[0] == "norm":
            yield path, var, ["model.norm.weight"]
        elif path[0] == "layers" and scanned:
            names = [f"model.layers.{i}.{_suffix(path[1:])}" for i in range(cfg.num_hidden_layers)]
            yield path, var, names
        elif path[0] == "layers":
            yield path, var, [f"model.layers.{path[1]}.{_suffix(path[2:])}"]
        else:  # pragma: no cover - the model has no other parameters
            raise AssertionError(f"unmapped parameter {path}")


# ----------------------------------------------------------------------------- reading
def _checkpoint_index(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file; refuses pickle-only folders without opening them."""
    st_io.require_safetensors()
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    index, single = path / INDEX_FILE, path / SINGLE_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{index}: not valid JSON ({err}); expected {{\"weight_map\": {{tensor: file}}}}") from None
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        files = {name: path / str(fname) for name, fname in weight_map.items()}
        for fname in sorted(set(map(str, weight_map.values()))):
            if not (path / fname).is_file():
                raise CheckpointError(f"{index} lists shard {fname!r}, which is missing from {path}")
        return files
    if single.is_file():
        return {name: single for name in st_io.read_header(single)}
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{path} holds only pickle checkpoint files ({', '.join(pickles)}); these are refused "
            "because unpickling can run arbitrary code and nothing was loaded. Convert the "
            f"checkpoint to safetensors ({SINGLE_FILE} or {INDEX_FILE} with shards)."
        )
    raise FileNotFoundError(f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def _ignored(name: str) -> bool:
    """Tensors a folder may hold beyond the model's: old rotary buffers, and with tied embeddings
    a saved ``lm_head`` copy (transformers ignores both)."""
    return bool(_IGNORED.match(name)) or name == "lm_head.weight"


def read_config(path: str | Path) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face folder's ``config.json``.

    Raises:
      FileNotFoundError: no folder ``path``, or no ``config.json`` in it.
      CheckpointError: ``config.json`` is not JSON, names custom code (``auto_map``), an
        unsupported ``model_type`` or RoPE type, or a field of the wrong type (named).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist" if not path.exists()
                                else f"model path {path} is not a folder")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
    try:
        return ModelConfig.from_json_file(path / "config.json")
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def check_hf(path: str | Path) -> ModelConfig:
    """Checks a Hugging Face folder without reading tensor data and returns its `ModelConfig`:
    ``config.json`` (`read_config`), the safetensors files or index, every file's header
    (complete, not truncated) and every tensor's name and shape against the config.

    Raises the errors of `read_config`, and `CheckpointError` naming the file or tensor."""
    path = Path(path)
    config = read_config(path)
    files = _checkpoint_index(path)
    st_io.check_tensors(hf_tensor_shapes(config), st_io.header_shapes(files), files, path, _ignored)
    return config


def load_hf(path: str | Path, dtype: Any = jnp.float32, shardings: ShardingSpec | None = None, *,
            peft: str | Path | None = None, **model_options: Any) -> CausalLM:
    """Load a local Hugging Face LLaMA/Mistral folder into a `CausalLM`.

    Args:
      path: folder with ``config.json`` and ``model.safetensors`` or
        ``model.safetensors.index.json`` plus shards. Pickle files are refused.
      dtype: parameter dtype every tensor is cast to (e.g. ``jnp.bfloat16``).
      shardings: where to place parameters: ``None`` (default device), a ``jax.sharding.Mesh``
        (logical axes mapped by `partitioning.DEFAULT_RULES` onto mesh axes data/fsdp/tensor),
        ``(mesh, rules)`` with a logical-name -> mesh-axes mapping, or a callable
        ``(path, shape, logical_axes) -> jax.sharding.Sharding`` (``path`` like
        ``"layers.3.self_attn.q_proj"``, shape of the full, possibly layer-stacked, array).
      peft: a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``,
        as `lora.save_peft` or ``PeftModel.save_pretrained`` write it) to add onto the base
        model: the result carries float32 `nnx.LoRAParam` adapters (`lora.load_peft`). Its
        config and tensor shapes are checked against ``config.json`` before anything is read.
      **model_options: fields of `ModelOptions` other than ``param_dtype``
        (``compute_dtype``, ``attention_impl``, ``scan_layers``, ``remat_policy``).

    Raises:
      FileNotFoundError: no folder, no ``config.json`` or no safetensors file.
      CheckpointError (a ValueError): pickle-only folder; missing / unexpected / mis-shaped
        tensors (the message names the tensor with expected and found shapes); a truncated or
        damaged safetensors file (named); a ``config.json`` that is not JSON, names custom code
        or an unsupported ``model_type`` or RoPE type; an adapter that does not fit the base
        model (see `lora.read_peft_config`).
    """
    path, dtype = Path(path), jnp.dtype(dtype)
    options = ModelOptions(param_dtype=dtype, **model_options)
    config = read_config(path)
    files = _checkpoint_index(path)
    st_io.check_tensors(hf_tensor_shapes(config), st_io.header_shapes(files), files, path, _ignored)
    if peft is not None:
        lora.read_peft_config(peft, config)  # fail before reading any base tensor

    abstract = nnx.eval_shape(lambda: CausalLM(config, options, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    place = sharding_fn(shardings)
    loaded = []
    hf_shapes = hf_tensor_shapes(config)
    table = list(_param_table(state, config, options.scan_layers))
    mapped = sorted(n for *_, names in table for n in names)
    if mapped != sorted(hf_shapes):  # pragma: no cover - guards the name mapping itself
        raise AssertionError(f"parameter/tensor mapping mismatch: {sorted(set(mapped) ^ set(hf_shapes))}")
    for p, var, names in table:
        full_shape = tuple(var.shape)
        host = st_io.aligned_empty(full_shape, dtype)
        layers = host.reshape((len(names), -1)) if len(names) > 1 else host.reshape((1, -1))
        for i, n in enumerate(names):  # one tensor, or one per layer of a stacked parameter
            try:
                st_io.read_into(files[n], n, layers[i].reshape(hf_shapes[n]))
            except (st_io.SafetensorError, OSError) as err:
                raise CheckpointError(f"{files[n]}: cannot read tensor {n} ({err})") from None
        sharding = None if place is None else place(
            ".".join(map(str, p)), full_shape, logical_axes(var, len(full_shape)))
        loaded.append((p, var.replace(st_io.to_device(host, sharding))))
        del host, layers
    model = nnx.merge(graphdef, nnx.from_flat_state(loaded))
    return model if peft is None else lora.load_peft(model, peft, shardings)


# ----------------------------------------------------------------------------- writing
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)


def parse_size(size: int | str) -> int:
    """``5GB`` -> 5e9 bytes, ``2GiB`` -> 2*2**30; ints pass through."""
    if isinstance(size, int):
        return size
    m = _SIZE.match(size)
    if not m:
        raise ValueError(f"max_shard_size {size!r} is not a size like 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * mult)


def _export_tensors(model: CausalLM) -> Iterator[tuple[str, tuple[int, ...], Any, Any]]:
    """``(hf_name, hf_shape, dtype, fetch)`` in checkpoint order; ``fetch()`` gives a host array."""
    cfg = model.config
    shapes = hf_tensor_shapes(cfg)
    scanned = model.options.scan_layers
    for _, var, names in _param_table(nnx.state(model, nnx.Param), cfg, scanned):
        arr = var[...]
        for i, n in enumerate(names):
            def fetch(arr=arr, i=i, n=n, stacked=len(names) > 1):
                a = arr[i] if stacked else arr
                return host_value(a).reshape(shapes[n])
            yield n, shapes[n], arr.dtype, fetch


def save_hf(model: CausalLM, path: str | Path, tokenizer: Any = None, *, overwrite: bool = False,
            max_shard_size: int | str = "5GB") -> Path | None:
    """Write ``model`` as a Hugging Face folder that ``AutoModelForCausalLM.from_pretrained`` loads.

    Writes ``config.json`` (``dtype`` = parameter dtype), safetensors weights (one
    ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards plus
    ``model.safetensors.index.json`` when larger than ``max_shard_size``) and, if given,
    ``tokenizer.save_pretrained`` files. Only one shard is held on the host at a time. A model
    with LoRA adapters is saved with the adapters merged into its weights (`lora.merge_lora`);
    `lora.save_peft` writes the adapters alone.

    A model spread over several processes: every process calls ``save_hf`` (each tensor is
    gathered to the hosts one at a time, `partitioning.host_value`) and process 0 writes the
    folder; the others return None.

    Raises:
      FileExistsError: ``path`` is a non-empty folder (or a file) and ``overwrite`` is False.
    """
    st_io.require_safetensors()
    limit = parse_size(max_shard_size)
    if lora.lora_config(model) is not None:
        model = lora.merge_lora(model)
    if jax.process_index() != 0:  # take part in every tensor's gather, write nothing
        for *_, fetch in _export_tensors(model):
            fetch()
        return None

    def fill(tmp: Path) -> None:
        tensors = list(_export_tensors(model))
        shards: list[list] = [[]]
        size = 0
        for t in tensors:
            nbytes = int(np.prod(t[1])) * jnp.dtype(t[2]).itemsize
            if shards[-1] and size + nbytes > limit:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += nbytes
        n = len(shards)
        weight_map, total = {}, 0
        for k, shard in enumerate(shards, 1):
            fname = SINGLE_FILE if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"
            arrays = {name: fetch() for name, _, _, fetch in shard}
            total += sum(a.nbytes for a in arrays.values())
            st_io.save_file(arrays, str(tmp / fname), metadata={"format": "pt"})
            del arrays
            weight_map |= {name: fname for name, *_ in shard}
        if n > 1:
            with open(tmp / INDEX_FILE, "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        model.config.to_json_file(tmp / "config.json", dtype=model.embed_tokens[...].dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    return write_folder(path, fill, overwrite=overwrite)
