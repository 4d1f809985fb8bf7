"""Is it really forgotten? Attacks that bring unlearned knowledge back: relearning and quantization.

*Relearning* (Łucki et al., arXiv 2409.18025; arXiv 2410.08827): fine-tune a copy of the model
for ``steps`` AdamW steps of the token-mean NLL (`jax_unlearn.objectives.nll`, the library's
single-task step `jax_unlearn.step.make_step`) on a few texts -- part of the forget set, or
benign texts only -- and measure again, on what the fine-tuning did not show. The share of
the forgotten accuracy that came back is `recovered_fraction`
``(after - unlearned) / (original - unlearned)``.

*Quantization* (Zhang et al., ICLR 2025, "Catastrophic failure of LLM unlearning via
quantization"): round-to-nearest weight-only ``b``-bit quantization of every linear layer of
the decoder (attention q/k/v/o, MLP gate/up/down; embeddings, norms and ``lm_head`` stay),
dequantized back to the weight's dtype (`quantize_rtn`, `quantize_model`). Per output channel,
or per group of ``group_size`` consecutive input weights of a channel, with the asymmetric
min/max grid of GPTQ's ``Quantizer`` (zero always representable)::

    lo = min(min(w), 0), hi = max(max(w), 0)        (lo = -1, hi = 1 when both are 0)
    s = (hi - lo) / (2^b - 1),  z = round(-lo / s)
    q = clip(round(w / s) + z, 0, 2^b - 1)           # the stored integer, b bits
    w_hat = s * (q - z)

*Paraphrases* need questions in templates the model never saw; the embedded benchmark builds
them (`jax_unlearn.bench.world.PARAPHRASES`), `EvalSuite` evaluates paraphrase files given to
it. See docs/reference.md ("Robustness attacks").
"""

from __future__ import annotations

import dataclasses
import re
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax_unlearn import step as st
from jax_unlearn.data import EpochBatches
from jax_unlearn.models import lora_config, merge_lora
from jax_unlearn.objectives import nll

# linear weights of a decoder layer -> (number of leading output axes, ndim of one layer's weight);
# the weights are stored [out..., in...]: q/k/v [heads, head_dim, D], o [D, heads, head_dim], MLP [out, in]
LINEAR = {"q_proj": (2, 3), "k_proj": (2, 3), "v_proj": (2, 3), "o_proj": (1, 3),
          "gate_proj": (1, 2), "up_proj": (1, 2), "down_proj": (1, 2)}
SCHEME = re.compile(r"int(\d+)(?:_g(\d+))?")


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """``bits`` per weight, per output channel (``group_size=None``) or per group of
    ``group_size`` input weights. Named ``int{bits}`` or ``int{bits}_g{group_size}``."""

    bits: int
    group_size: int | None = None

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError(f"quantization bits must lie in [2, 8], got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"quantization group size must be >= 1, got {self.group_size}")

    @property
    def name(self) -> str:
        return f"int{self.bits}" + ("" if self.group_size is None else f"_g{self.group_size}")


def parse_scheme(name: str) -> QuantScheme:
    """``"int8"``, ``"int4"`` (per channel), ``"int4_g128"`` (per group of 128) -> `QuantScheme`."""
    m = SCHEME.fullmatch(str(name))
    if m is None:
        raise ValueError(f"quantization scheme {name!r}: expected int<bits> or int<bits>_g<group size>, "
                         "e.g. int8, int4, int4_g128")
    return QuantScheme(int(m.group(1)), None if m.group(2) is None else int(m.group(2)))


@partial(jax.jit, static_argnums=(1, 2))
def _rtn(x: jax.Array, bits: int, group_size: int | None) -> jax.Array:
    n = x.shape[-1]
    g = n if group_size is None else min(group_size, n)
    pad = -n % g  # zero padding: 0 is inside every grid's range, so it changes no group's lo / hi
    xp = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]).reshape(*x.shape[:-1], -1, g)  # [..., out, groups, g]
    levels = 2 ** bits - 1
    lo = jnp.minimum(xp.min(-1, keepdims=True), 0.0)
    hi = jnp.maximum(xp.max(-1, keepdims=True), 0.0)
    empty = (lo == 0) & (hi == 0)
    lo, hi = jnp.where(empty, -1.0, lo), jnp.where(empty, 1.0, hi)
    scale = (hi - lo) / levels
    zero = jnp.round(-lo / scale)
    q = jnp.clip(jnp.round(xp / scale) + zero, 0, levels)
    return (scale * (q - zero)).reshape(*x.shape[:-1], -1)[..., :n]


def quantize_rtn(w: jax.Array, bits: int, group_size: int | None = None) -> jax.Array:
    """Round-to-nearest ``bits``-bit quantization of ``w [..., out, in]``, dequantized to ``w.dtype``.

    Each row (output channel) of the last axis, or each group of ``group_size`` consecutive
    entries of it (the last group of a row may be shorter), gets its own grid (module
    docstring). Arithmetic in float32.
    """
    QuantScheme(bits, group_size)
    w = jnp.asarray(w)
    return _rtn(w.astype(jnp.float32), bits, group_size).astype(w.dtype)


def _quantize_linear(w: jax.Array, name: str, scheme: QuantScheme) -> jax.Array:
    """One linear weight in its stored layout (a leading ``layers`` axis when layers are scanned)."""
    n_out, ndim = LINEAR[name]
    lead = w.ndim - ndim
    shape = w.shape
    out = int(np.prod(shape[lead:lead + n_out]))
    flat = w.reshape(*shape[:lead], out, -1)  # [(layers,) out, in]
    return quantize_rtn(flat, scheme.bits, scheme.group_size).reshape(shape)


def quantize_model(model: Any, scheme: QuantScheme | str) -> Any:
    """A copy of ``model`` (a `CausalLM`; LoRA adapters merged first) with every decoder linear
    weight replaced by its `quantize_rtn` value; ``model`` is unchanged."""
    scheme = parse_scheme(scheme) if isinstance(scheme, str) else scheme
    new = merge_lora(model) if lora_config(model) is not None else nnx.clone(model)
    layers = [new.layers] if new.options.scan_layers else list(new.layers)
    for layer in layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in LINEAR:
                w = getattr(parent, name, None)
                if isinstance(w, nnx.Param):
                    setattr(parent, name, w.replace(_quantize_linear(w[...], name, scheme)))
    return new


# ----------------------------------------------------------------------------- relearning


@dataclasses.dataclass(frozen=True)
class RelearnConfig:
    """``steps`` AdamW steps (``lr``, no weight decay) of ``batch_size`` rows, in the seeded epoch
    order of `jax_unlearn.data.EpochBatches` (``seed``)."""

    steps: int = 10
    lr: float = 1e-5
    batch_size: int = 4
    seed: int = 0

    def __post_init__(self):
        for key in ("steps", "batch_size"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"relearn {key} must be an integer >= 1, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and np.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"relearn lr must be a finite number > 0, got {self.lr!r}")


class Relearner:
    """Fine-tunes copies of models with one compiled step per model structure.

    >>> attack = Relearner(RelearnConfig(steps=5, lr=1e-3, batch_size=8))  # doctest: +SKIP
    >>> relearned = attack(unlearned_model, rows)  # rows: input_ids / attention_mask / labels [n, seq]  # doctest: +SKIP
    """

    def __init__(self, config: RelearnConfig = RelearnConfig()):
        self.config = config
        self.tx = optax.adam(config.lr)
        self._steps: dict = {}  # graphdef -> compiled step (graphdefs of equal structure compare equal)

    def __call__(self, model: Any, rows: dict[str, np.ndarray], name: str = "relearning") -> Any:
        """A fine-tuned copy of ``model`` (``model`` is unchanged: the step trains its own buffers)."""
        defs, state = st.init_state(model, self.tx)  # copy=True: the model keeps its weights
        step = self._steps.get(defs.graphdef)
        if step is None:
            step = self._steps[defs.graphdef] = st.make_step(defs, nll, self.tx)
        data = EpochBatches(rows, self.config.batch_size, self.config.seed, name)
        for t in range(self.config.steps):
            state, _ = step(state, data(t))
        return st.merge_model(defs, state, copy=False)


def relearn(model: Any, rows: dict[str, np.ndarray], config: RelearnConfig = RelearnConfig()) -> Any:
    """A copy of ``model`` fine-tuned on ``rows`` (`Relearner`; compiles its step once)."""
    return Relearner(config)(model, rows)


def recovered_fraction(after: float | None, unlearned: float | None, original: float | None,
                       min_gap: float = 0.01) -> float | None:
    """``(after - unlearned) / (original - unlearned)``: the share of the accuracy unlearning
    removed that an attack brought back (0: none, 1: all, > 1: more than was there, < 0: the
    attack removed more). ``None`` when a value is missing or unlearning removed less than
    ``min_gap`` (``original - unlearned < min_gap``: nothing, or too little, to recover)."""
    if after is None or unlearned is None or original is None:
        return None
    gap = original - unlearned
    return None if gap < min_gap else float((after - unlearned) / gap)
