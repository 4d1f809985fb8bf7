"""Model configuration: a typed, frozen view of a Hugging Face LLaMA/Mistral ``config.json``.

`ModelConfig` holds what defines the *checkpoint* (shapes, RoPE, norms, special ids) and is
read from / written to ``config.json``. `ModelOptions` holds how *we* run it (dtypes,
attention kernel, scan over layers, remat) and never goes into ``config.json``.

Both transformers layouts of RoPE settings are read:

* 5.x: ``"rope_parameters": {"rope_type": ..., "rope_theta": ..., "factor": ...}``
* 4.x: ``"rope_theta": ...`` plus ``"rope_scaling": {"rope_type" | "type": ..., ...}``

and both are written, so transformers 4.x and 5.x (and vLLM, lm-eval) read our exports.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = ("silu",)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}


@dataclasses.dataclass(frozen=True, slots=True)
class RopeScaling:
    """RoPE frequency scaling (``rope_type`` other than ``default``).

    * ``linear``: ``inv_freq / factor`` (position interpolation).
    * ``llama3``: Llama 3.1 piecewise scaling: wavelengths ``> original_max/low_freq_factor``
      are divided by ``factor``, wavelengths ``< original_max/high_freq_factor`` are kept, and
      the band between is interpolated smoothly.
    """

    rope_type: Literal["linear", "llama3"]
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"rope_type": self.rope_type, "factor": self.factor}
        if self.rope_type == "llama3":
            d["low_freq_factor"] = self.low_freq_factor
            d["high_freq_factor"] = self.high_freq_factor
            d["original_max_position_embeddings"] = self.original_max_position_embeddings
        return d


@dataclasses.dataclass(frozen=True, slots=True)
class ModelConfig:
    """Architecture of a LLaMA- or Mistral-family decoder (fields named as in HF ``config.json``)."""

    model_type: Literal["llama", "mistral"]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None  # default hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.head_dim is None and isinstance(self.hidden_size, int) and isinstance(self.num_attention_heads, int):
            if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads:
                raise ValueError(f"config field 'head_dim' is unset and 'hidden_size' ({self.hidden_size}) is not a "
                                 f"multiple of 'num_attention_heads' ({self.num_attention_heads}); set head_dim")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config field 'model_type' is {self.model_type!r}; supported values: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"config field {name!r} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config field 'num_attention_heads' ({self.num_attention_heads}) must be a "
                f"multiple of 'num_key_value_heads' ({self.num_key_value_heads})"
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"config field 'sliding_window' must be positive or null, "
                             f"got {self.sliding_window}")

    # ----------------------------------------------------------------------------- derived
    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """``eos_token_id`` as a tuple (empty when unset)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies ``[head_dim // 2]`` (float32), scaling applied."""
        dim = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
        inv = inv.astype(np.float32)
        rs = self.rope_scaling
        if rs is None:
            return inv
        if rs.rope_type == "linear":
            return (inv / rs.factor).astype(np.float32)
        # llama3
        old_len = rs.original_max_position_embeddings
        low_wl = old_len / rs.low_freq_factor
        high_wl = old_len / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wl, inv / rs.factor, inv)
        smooth = (old_len / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        return np.where(medium, smoothed, scaled).astype(np.float32)

    # ----------------------------------------------------------------------------- HF I/O
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
        """Parse a HF config dict (transformers 4.x or 5.x layout); errors name ``source`` and field."""

        def need(key: str) -> Any:
            if key not in d or d[key] is None:
                raise ValueError(f"{source}: required field {key!r} is missing")
            return d[key]

        def integer(key: str, value: Any) -> int:
            if isinstance(value, bool) or not (isinstance(value, int) or isinstance(value, float) and value.is_integer()):
                raise ValueError(f"{source}: field {key!r} must be an integer, got {value!r}")
            return int(value)

        model_type = d.get("model_type")
        custom = d.get("auto_map")
        if custom:  # transformers would import Python code shipped with the folder
            raise ValueError(
                f"{source}: field 'auto_map' names custom model code ({_auto_map_text(custom)}); jax_unlearn "
                f"never runs code from a model folder and implements only {', '.join(SUPPORTED_MODEL_TYPES)}"
                + (f" (this folder's 'model_type' is {model_type!r})" if model_type not in SUPPORTED_MODEL_TYPES
                   else f"; if the checkpoint is a standard {model_type} model, remove 'auto_map' from {source}")
            )
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{source}: field 'model_type' is {model_type!r}; supported values: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        act = d.get("hidden_act", "silu")
        if act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"{source}: field 'hidden_act' is {act!r}; supported values: "
                             f"{', '.join(SUPPORTED_ACTIVATIONS)}")
        if float(d.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
            raise ValueError(f"{source}: field 'partial_rotary_factor' must be 1.0")

        rope_theta, rope_scaling = _parse_rope(d, source)
        hidden = integer("hidden_size", need("hidden_size"))
        heads = integer("num_attention_heads", need("num_attention_heads"))
        kv = d.get("num_key_value_heads")
        if heads <= 0:
            raise ValueError(f"{source}: field 'num_attention_heads' must be a positive integer, got {heads}")
        head_dim = d.get("head_dim") or hidden // heads
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            eos = tuple(int(e) for e in eos)
        sliding = d.get("sliding_window") if model_type == "mistral" else None
        is_llama = model_type == "llama"  # transformers' Mistral has no q/k/v/o or MLP biases
        return cls(
            model_type=model_type,
            vocab_size=integer("vocab_size", need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=integer("intermediate_size", need("intermediate_size")),
            num_hidden_layers=integer("num_hidden_layers", need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=integer("num_key_value_heads", kv) if kv is not None else heads,
            head_dim=integer("head_dim", head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)) and is_llama,
            mlp_bias=bool(d.get("mlp_bias", False)) and is_llama,
            sliding_window=int(sliding) if sliding is not None else None,
            max_position_embeddings=integer("max_position_embeddings", d.get("max_position_embeddings") or 2048),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=d.get("pad_token_id"),
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
                             "expected a Hugging Face model config object") from None
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object of config fields, got {type(d).__name__}")
        return cls.from_hf_dict(d, source=str(path))

    def to_hf_dict(self, dtype: Any = None) -> dict[str, Any]:
        """HF ``config.json`` content (both 5.x ``rope_parameters`` and 4.x ``rope_theta``/``rope_scaling``)."""
        rope_params = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope_params = {**self.rope_scaling.to_hf_dict(), "rope_theta": self.rope_theta}
        d: dict[str, Any] = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope_params,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_hf_dict() if self.rope_scaling else None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
            else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "attention_dropout": 0.0,
            "use_cache": True,
        }
        if self.model_type == "llama":
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = self.mlp_bias
        else:
            d["sliding_window"] = self.sliding_window
        if dtype is not None:
            d["dtype"] = jnp.dtype(dtype).name
        return d

    def to_json_file(self, path: str | Path, dtype: Any = None) -> None:
        with open(path, "w") as f:
            json.dump(self.to_hf_dict(dtype), f, indent=2, sort_keys=True)
            f.write("\n")


def _auto_map_text(auto_map: Any) -> str:
    """``auto_map`` of a config (``{"AutoModelForCausalLM": "modeling_x.XForCausalLM", ...}``) in words."""
    if isinstance(auto_map, dict):
        return ", ".join(f"{k}: {v}" for k, v in auto_map.items())
    return repr(auto_map)


def _parse_rope(d: dict[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """Return ``(rope_theta, scaling)`` from either transformers layout."""
    rp = d.get("rope_parameters")
    rs = d.get("rope_scaling")
    if rs:  # 4.x layout (transformers 5 also prefers it when both are present)
        params, field = dict(rs), "rope_scaling"
        theta = d.get("rope_theta", (rp or {}).get("rope_theta", 10000.0))
    elif rp:
        params, field = dict(rp), "rope_parameters"
        if "rope_type" not in params and "type" not in params and any(
            isinstance(v, dict) for v in params.values()
        ):
            raise ValueError(f"{source}: per-layer-type '{field}' is not supported")
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    else:
        return float(d.get("rope_theta", 10000.0)), None
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"{source}: field '{field}.rope_type' is {rope_type!r}; supported values: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return float(theta), None

    def need(key: str) -> Any:
        if params.get(key) is None:
            raise ValueError(f"{source}: field '{field}.{key}' is required for rope_type {rope_type!r}")
        return params[key]

    if rope_type == "linear":
        return float(theta), RopeScaling("linear", float(need("factor")))
    orig = params.get("original_max_position_embeddings") or d.get("max_position_embeddings")
    if orig is None:
        raise ValueError(f"{source}: field '{field}.original_max_position_embeddings' is required "
                         "for rope_type 'llama3'")
    return float(theta), RopeScaling(
        "llama3",
        factor=float(need("factor")),
        low_freq_factor=float(need("low_freq_factor")),
        high_freq_factor=float(need("high_freq_factor")),
        original_max_position_embeddings=int(orig),
    )


REMAT_POLICIES = ("full",) + tuple(
    n for n in ("nothing_saveable", "everything_saveable", "dots_saveable", "checkpoint_dots",
                "dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims")
    if hasattr(jax.checkpoint_policies, n)
)
ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")


@dataclasses.dataclass(frozen=True, slots=True)
class ModelOptions:
    """How to run a model (not part of the checkpoint).

    Attributes:
      param_dtype: dtype parameters are stored in (``load_hf(dtype=...)`` sets it).
      compute_dtype: dtype of activations and matmul inputs; ``None`` means ``param_dtype``.
        RMSNorm statistics, RoPE angles, attention softmax and the logits are float32 always.
      attention_impl: ``implementation`` of ``jax.nn.dot_product_attention``: ``None``/"xla"
        (portable) or "cudnn" (GPU flash attention).
      scan_layers: stack layer parameters (leading ``layers`` axis) and run them with
        ``jax.lax.scan``: compile time flat in depth.
      remat_policy: ``None`` (no rematerialisation), ``"full"`` (recompute everything in the
        backward pass) or the name of a ``jax.checkpoint_policies`` member, e.g.
        ``"dots_with_no_batch_dims_saveable"``; applied per decoder layer.

    (Chunked log-probabilities of the logits are an argument of the losses,
    ``objectives.*(logit_chunk=...)``, not a model option.)
    """

    param_dtype: Any = jnp.float32
    compute_dtype: Any = None
    attention_impl: Literal["xla", "cudnn"] | None = None
    scan_layers: bool = False
    remat_policy: str | None = None

    def __post_init__(self) -> None:
        if self.attention_impl not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"option 'attention_impl' is {self.attention_impl!r}; supported values: "
                             f"{ATTENTION_IMPLEMENTATIONS}")
        if self.remat_policy is not None and self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"option 'remat_policy' is {self.remat_policy!r}; supported values: None, "
                             f"{', '.join(REMAT_POLICIES)}")

    @property
    def dtype(self) -> Any:
        return self.param_dtype if self.compute_dtype is None else self.compute_dtype
