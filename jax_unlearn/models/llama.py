"""One Flax NNX decoder for the LLaMA and Mistral families (float-exact with transformers).

Maths per layer (pre-norm): ``x += Attn(RMSNorm(x)); x += MLP(RMSNorm(x))`` with

* ``RMSNorm(x) = w * x / sqrt(mean(x^2) + eps)`` (statistics in float32),
* RoPE in HF ``rotate_half`` layout: ``q' = q*cos(p*f) + rotate_half(q)*sin(p*f)`` where
  ``f = concat(inv_freq, inv_freq)``; checkpoints therefore load without any q/k permutation,
* grouped-query attention ``softmax(q k^T / sqrt(head_dim) + mask) v`` with ``K`` key/value
  heads shared by ``N/K`` query heads; the mask is causal, hides padding and, for Mistral,
  limits key slot ``j`` to ``i - sliding_window < j <= i`` (transformers' semantics),
* SwiGLU MLP ``down(silu(gate(x)) * up(x))``.

Weights keep the Hugging Face ``[out, in]`` memory layout (only reshaped, e.g. ``q_proj``
``[N*H, D]`` -> ``[N, H, D]``), so loading and saving never transposes. Every parameter
carries logical axis names in its ``out_sharding`` metadata (``nnx.get_partition_spec``
under ``flax.linen.logical_axis_rules`` maps them to mesh axes): ``vocab``, ``embed``,
``heads``, ``kv_heads``, ``head_dim``, ``mlp``, ``norm`` and ``layers`` (stacked layers).

Each projection ``<name>`` (``q_proj`` ... ``down_proj``) has an optional low-rank adapter
``<name>_lora``: ``None`` here, set by `jax_unlearn.models.lora.add_lora` to a module mapping the
projection's input ``[..., in]`` to an update ``[..., out]`` (flattened HF layout) that is added to
the projection's output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import head_grad
from . import partitioning as part
from .config import ModelConfig, ModelOptions

Array = jax.Array


class KVCache(NamedTuple):
    """Keys/values of all layers: ``k``, ``v`` are ``[layers, batch, slots, kv_heads, head_dim]``."""

    k: Array
    v: Array


def _param(rngs: nnx.Rngs | None, shape, axes, dtype, init: str = "normal") -> nnx.Param:
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def _weight(var: nnx.Param, dtype=None) -> Array:
    """A parameter's value cast to ``dtype`` (None: kept) and gathered over the batch mesh axes
    when a mesh is set (`partitioning.gathered`: FSDP moves weights, not activations)."""
    w = var[...] if dtype is None else var[...].astype(dtype)
    return part.gathered(w, part.weight_axes(var, w.ndim))


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """``weight * x / sqrt(mean(x^2, -1) + eps)``; statistics in float32, result in ``x.dtype``."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * y.astype(x.dtype)


class RMSNorm(nnx.Module):
    """`rms_norm`; without a remat policy its backward recomputes the float32 statistics from
    ``x`` instead of keeping them (`_recomputed`)."""

    def __init__(self, dim: int, eps: float, opts: ModelOptions):
        self.eps = eps
        self.weight = _param(None, (dim,), ("norm",), opts.param_dtype, "ones")  # [dim]
        self.recompute = opts.remat_policy is None

    def __call__(self, x: Array) -> Array:
        return _recomputed(rms_norm, self.recompute, static_argnums=2)(x, self.weight[...], self.eps)


def _recomputed(f: Callable, on: bool, **kwargs) -> Callable:
    """``jax.checkpoint(f)`` when ``on``: ``f``'s backward recomputes its element-wise
    intermediates from its inputs (no matmul is recomputed: ``f`` has none whose output the
    backward reads), so only the inputs are kept. Used without a layer remat policy, where autodiff
    would keep every intermediate of every layer (the 1B step on the H100 compiler: 33 -> 22 GiB,
    docs/benchmarks.md); under a policy the layer's checkpoint decides."""
    return jax.checkpoint(f, **kwargs) if on else f


def rope_tables(positions: Array, inv_freq: np.ndarray) -> tuple[Array, Array]:
    """cos/sin ``[batch, seq, 1, head_dim]`` (float32) for integer ``positions [batch, seq]``."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [b, s, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """``x*cos + rotate_half(x)*sin`` with ``rotate_half([a, b]) = [-b, a]``; ``x [b, s, heads, hd]``."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rot = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(jnp.float32) * cos + rot * sin).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, opts: ModelOptions, rngs: nnx.Rngs):
        D, N, K, H, dt = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, opts.param_dtype
        self.cfg, self.opts = cfg, opts
        self.q_proj = _param(rngs, (N, H, D), ("heads", "head_dim", "embed"), dt)
        self.k_proj = _param(rngs, (K, H, D), ("kv_heads", "head_dim", "embed"), dt)
        self.v_proj = _param(rngs, (K, H, D), ("kv_heads", "head_dim", "embed"), dt)
        self.o_proj = _param(rngs, (D, N, H), ("embed", "heads", "head_dim"), dt)
        bias = cfg.attention_bias
        self.q_bias = _param(rngs, (N, H), ("heads", "head_dim"), dt, "zeros") if bias else None
        self.k_bias = _param(rngs, (K, H), ("kv_heads", "head_dim"), dt, "zeros") if bias else None
        self.v_bias = _param(rngs, (K, H), ("kv_heads", "head_dim"), dt, "zeros") if bias else None
        self.o_bias = _param(rngs, (D,), ("embed",), dt, "zeros") if bias else None
        self.q_proj_lora = self.k_proj_lora = self.v_proj_lora = self.o_proj_lora = nnx.data(None)

    def _proj(self, x, w, b, lora):
        y = jnp.einsum("btd,khd->btkh", x, _weight(w, x.dtype))
        if lora is not None:
            y = y + lora(x).reshape(y.shape)
        return y if b is None else y + b[...].astype(x.dtype)

    def __call__(self, x, cos, sin, mask, kv=None, index=None):
        """``x [b, t, D]`` -> ``[b, t, D]`` and the updated ``(k, v)`` cache ``[b, slots, K, H]``.

        Without a cache, attention is causal over ``t`` (plus ``mask [b, 1, t, t]`` for padding).
        With a cache, the new keys/values are written at slot ``index`` and ``mask
        [b, 1, t, slots]`` must encode causality, the window and padding.
        """
        q = part.constrain(apply_rope(self._proj(x, self.q_proj, self.q_bias, self.q_proj_lora), cos, sin),
                           part.HEADS)  # [b, t, N, H]
        k = part.constrain(apply_rope(self._proj(x, self.k_proj, self.k_bias, self.k_proj_lora), cos, sin),
                           part.KV_HEADS)  # [b, t, K, H]
        v = part.constrain(self._proj(x, self.v_proj, self.v_bias, self.v_proj_lora), part.KV_HEADS)
        window = self.cfg.sliding_window
        if kv is None:
            out = jax.nn.dot_product_attention(
                q, k, v, mask=mask, is_causal=True, implementation=self.opts.attention_impl,
                local_window_size=(window - 1, 0) if window is not None else None)
            new_kv = None
        else:
            k = jax.lax.dynamic_update_slice_in_dim(kv[0], k.astype(kv[0].dtype), index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(kv[1], v.astype(kv[1].dtype), index, axis=1)
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=self.opts.attention_impl)
            new_kv = (k, v)
        out = part.constrain(out, part.HEADS)
        y = jnp.einsum("btnh,dnh->btd", out, _weight(self.o_proj, x.dtype))
        if self.o_proj_lora is not None:
            y = y + self.o_proj_lora(out.reshape(*out.shape[:2], -1))
        return (y if self.o_bias is None else y + self.o_bias[...].astype(x.dtype)), new_kv


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, opts: ModelOptions, rngs: nnx.Rngs):
        D, F, dt = cfg.hidden_size, cfg.intermediate_size, opts.param_dtype
        self.gate_proj = _param(rngs, (F, D), ("mlp", "embed"), dt)
        self.up_proj = _param(rngs, (F, D), ("mlp", "embed"), dt)
        self.down_proj = _param(rngs, (D, F), ("embed", "mlp"), dt)
        b = cfg.mlp_bias
        self.gate_bias = _param(rngs, (F,), ("mlp",), dt, "zeros") if b else None
        self.up_bias = _param(rngs, (F,), ("mlp",), dt, "zeros") if b else None
        self.down_bias = _param(rngs, (D,), ("embed",), dt, "zeros") if b else None
        self.gate_proj_lora = self.up_proj_lora = self.down_proj_lora = nnx.data(None)
        self.recompute = opts.remat_policy is None

    @staticmethod
    def _lin(x, w, b, lora):
        y = jnp.einsum("...i,oi->...o", x, _weight(w, x.dtype))
        if lora is not None:
            y = y + lora(x)
        return y if b is None else y + b[...].astype(x.dtype)

    def __call__(self, x: Array) -> Array:
        """``down(silu(gate(x)) * up(x))``: ``[b, t, D] -> [b, t, D]``."""
        g = self._lin(x, self.gate_proj, self.gate_bias, self.gate_proj_lora)  # [b, t, F]
        u = self._lin(x, self.up_proj, self.up_bias, self.up_proj_lora)  # [b, t, F]

        def gated(g, u):
            return part.constrain(jax.nn.silu(g) * u, part.MLP)  # [b, t, F]

        def down(g, u):  # its backward needs g, u and down's weight, not its output
            return self._lin(gated(g, u), self.down_proj, self.down_bias, self.down_proj_lora)

        lora = self.down_proj_lora
        if lora is not None and lora.dropout is not None:  # draws randomness: only the product is recomputed
            return self._lin(_recomputed(gated, self.recompute)(g, u), self.down_proj, self.down_bias, lora)
        return _recomputed(down, self.recompute)(g, u)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, opts: ModelOptions, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, opts)
        self.self_attn = Attention(cfg, opts, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, opts)
        self.mlp = MLP(cfg, opts, rngs)

    def __call__(self, x, cos, sin, mask, kv=None, index=None):
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, index)
        x = part.constrain(x + h, part.HIDDEN)
        return part.constrain(x + self.mlp(self.post_attention_layernorm(x)), part.HIDDEN), kv


def _layer_apply(graphdef, policy: str | None, scanned: bool):
    """Pure ``(layer_state, x, cos, sin, mask, kv, index) -> (x, kv, rng_state)``, rematerialised if asked.

    ``rng_state`` is the layer's `nnx.RngState` after the call (active dropout advances its
    counters); the caller writes it back so the next call draws fresh masks.
    """

    def f(state, x, cos, sin, mask, kv, index):
        layer = nnx.merge(graphdef, state)
        x, kv = layer(x, cos, sin, mask, kv, index)
        return x, kv, nnx.state(layer, nnx.RngState)

    if policy is None:
        return f
    pol = None if policy == "full" else getattr(jax.checkpoint_policies, policy)
    return jax.checkpoint(f, policy=pol, prevent_cse=not scanned)


def _draws_randomness(module: nnx.Module) -> bool:
    """Whether an active (train-mode, ``rate > 0``) `nnx.Dropout` sits anywhere in ``module``."""
    return any(isinstance(m, nnx.Dropout) and m.rate > 0 and m.deterministic is False
               for _, m in nnx.iter_graph(module))


class CausalLM(nnx.Module):
    """LLaMA/Mistral causal LM: ``model(input_ids [b, t], attention_mask [b, t]) -> logits [b, t, vocab]``.

    Attributes mirror HF names: ``embed_tokens [vocab, D]``, ``layers`` (an ``nnx.List`` of
    `DecoderLayer`, or with ``options.scan_layers`` one `DecoderLayer` whose parameters have a
    leading ``layers`` axis), ``norm``, ``lm_head [vocab, D]`` (``None`` when tied).
    """

    def __init__(self, config: ModelConfig, options: ModelOptions | None = None, *, rngs: nnx.Rngs):
        opts = options or ModelOptions()
        self.config, self.options = config, opts
        self.embed_tokens = _param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), opts.param_dtype)
        if opts.scan_layers:
            @nnx.split_rngs(splits=config.num_hidden_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make(r):
                return DecoderLayer(config, opts, r)

            self.layers = make(rngs)
        else:
            self.layers = nnx.List([DecoderLayer(config, opts, rngs) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, opts)
        self.lm_head = None if config.tie_word_embeddings else _param(
            rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), opts.param_dtype)

    # ------------------------------------------------------------------ public forward API
    def __call__(self, input_ids: Array, attention_mask: Array | None = None, *,
                 return_hidden_at: int | None = None):
        """Logits ``[b, t, vocab]`` (float32).

        ``attention_mask [b, t]`` (1 = token, 0 = padding, left or right) hides padded keys, and
        RoPE positions are ``max(cumsum(attention_mask) - 1, 0)``, so a padded row's real tokens
        get exactly the logits they get unpadded. ``None`` means no padding.

        With ``return_hidden_at=l`` returns ``(logits, hidden)`` where ``hidden [b, t, D]`` is the
        residual stream after decoder layer ``l`` (0-based; HF ``hidden_states[l + 1]``).
        """
        x, hidden = self._trunk(input_ids, attention_mask, self.config.num_hidden_layers, return_hidden_at)
        logits = self.logits(self.norm(x))
        return logits if return_hidden_at is None else (logits, hidden)

    def hidden_at(self, input_ids: Array, attention_mask: Array | None, layer: int) -> Array:
        """Residual stream ``[b, t, D]`` after layer ``layer`` (0-based); runs layers ``0..layer`` only."""
        self._check_layer(layer, "layer")
        return self._trunk(input_ids, attention_mask, layer + 1, None)[0]

    def _check_layer(self, layer: int, name: str) -> None:
        if not 0 <= layer < self.config.num_hidden_layers:
            raise ValueError(f"{name}={layer} outside [0, {self.config.num_hidden_layers})")

    def final_hidden(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        """Final-normed hidden states ``[b, t, D]``: ``model(ids, mask) == model.logits(final_hidden(ids, mask))``.
        (On a mesh where `partitioning.split_vocab` holds, every device gets all rows, as
        `head_weight` then holds the device's vocabulary rows.)"""
        h = self.norm(self._trunk(input_ids, attention_mask, self.config.num_hidden_layers, None)[0])
        return part.constrain(h, part.ALL_ROWS if part.split_vocab(input_ids.size, self.config.vocab_size)
                              else part.HIDDEN)

    def embed(self, input_ids: Array) -> Array:
        """Token embeddings ``[b, t, D]`` in the compute dtype, each row on its devices.

        On a mesh, either every device looks up all tokens in its slice of the table and the
        rows then move to their devices (`partitioning.split_vocab`: fewer tokens than
        vocabulary entries; the table's gradient stays split), or the table is gathered."""
        if part.split_vocab(input_ids.size, self.config.vocab_size):
            table = head_grad.weight(self.embed_tokens[...].astype(self.options.dtype))
            x = table[part.constrain(input_ids, (None, None))]
        else:
            x = head_grad.weight(_weight(self.embed_tokens, self.options.dtype))[input_ids]
        return head_grad.looked_up(input_ids, part.constrain(x, part.HIDDEN))

    def head_weight(self, dtype=None, tokens: int | None = None) -> Array:
        """Output projection ``[vocab, D]`` (the input embedding when tied), in ``dtype`` (default:
        the parameter's). On a mesh it is gathered over the batch axes, or, for a batch of
        ``tokens`` where `partitioning.split_vocab` holds, split by vocabulary rows over all devices."""
        var = self.embed_tokens if self.lm_head is None else self.lm_head
        head_grad.head_used("embed_tokens" if self.lm_head is None else "lm_head")
        if tokens is not None and part.split_vocab(tokens, self.config.vocab_size):
            w = var[...] if dtype is None else var[...].astype(dtype)
            return part.constrain(w, part.SPLIT_HEAD)
        return _weight(var, dtype)

    def logits(self, h: Array) -> Array:
        """``h [b, t, D]`` (final-normed) -> float32 ``[b, t, vocab]``."""
        tokens = h.shape[0] * h.shape[1]
        w = self.head_weight(h.dtype, tokens)
        if part.split_vocab(tokens, self.config.vocab_size):
            logits = jnp.einsum("btd,vd->btv", part.constrain(h, part.ALL_ROWS), w, preferred_element_type=jnp.float32)
            return part.constrain(logits, part.SPLIT_LOGITS)
        logits = jnp.einsum("btd,vd->btv", h, w, preferred_element_type=jnp.float32)
        return part.constrain(logits, part.LOGITS)

    # ------------------------------------------------------------------ cached decoding
    def init_cache(self, batch: int, slots: int, dtype=None) -> KVCache:
        c = self.config
        shape = (c.num_hidden_layers, batch, slots, c.num_key_value_heads, c.head_dim)
        z = jnp.zeros(shape, dtype or self.options.dtype)
        return KVCache(z, z)

    def decode(self, input_ids: Array, positions: Array, kv_valid: Array, cache: KVCache, index: Array,
               last_only: bool = False):
        """Run ``input_ids [b, t]`` written at cache slots ``index .. index+t-1``.

        ``positions [b, t]`` are RoPE positions, ``kv_valid [b, slots]`` marks real tokens (the
        new ones included). Returns ``(logits [b, t, vocab], cache)``; with ``last_only`` the
        logits are ``[b, 1, vocab]`` for the last slot only (cheap prefill).
        """
        t, slots = input_ids.shape[1], cache.k.shape[2]
        q_slot = index + jnp.arange(t)[:, None]
        k_slot = jnp.arange(slots)[None, :]
        allowed = k_slot <= q_slot
        if self.config.sliding_window is not None:
            allowed &= k_slot > q_slot - self.config.sliding_window
        mask = allowed[None, None] & kv_valid.astype(bool)[:, None, None, :]  # [b, 1, t, slots]
        x = self.embed(input_ids)
        x, _, cache = self._layers(x, positions, mask, self.config.num_hidden_layers, None, cache, index)
        return self.logits(self.norm(x[:, -1:] if last_only else x)), cache

    # ------------------------------------------------------------------ internals
    def _trunk(self, input_ids, attention_mask, n_layers, hidden_at):
        if attention_mask is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
            mask = None
        else:
            am = attention_mask.astype(jnp.int32)
            positions = jnp.maximum(jnp.cumsum(am, axis=-1) - 1, 0)
            mask = jnp.broadcast_to(am.astype(bool)[:, None, None, :],
                                    (am.shape[0], 1, am.shape[1], am.shape[1]))
        if hidden_at is not None:
            self._check_layer(hidden_at, "return_hidden_at")
        x = self.embed(input_ids)
        x, hidden, _ = self._layers(x, positions, mask, n_layers, hidden_at, None, None)
        return x, hidden

    def _layers(self, x, positions, mask, n, hidden_at, cache, index):
        """Apply the first ``n`` layers; returns ``(x, hidden after layer hidden_at, cache)``."""
        cos, sin = rope_tables(positions, self.config.inv_freq())
        policy = self.options.remat_policy
        if self.options.scan_layers:
            graphdef, state = nnx.split(self.layers)
            if n < self.config.num_hidden_layers:
                state = jax.tree.map(lambda a: a[:n], state)
            f = _layer_apply(graphdef, policy, scanned=True)

            def body(carry, xs):
                h, saved = carry
                st, i, kv = xs
                h, kv, rng = f(st, h, cos, sin, mask, kv, index)
                if hidden_at is not None:
                    saved = jnp.where(i == hidden_at, h, saved)
                return (h, saved), (kv, rng)

            kvs = None if cache is None else (cache.k, cache.v)
            (x, hidden), (new, rng) = jax.lax.scan(body, (x, jnp.zeros_like(x)), (state, jnp.arange(n), kvs))
            if _draws_randomness(self.layers):  # keep the advanced dropout counters of layers 0..n-1
                old = nnx.state(self.layers, nnx.RngState)
                nnx.update(self.layers, jax.tree.map(lambda o, r: o.at[:n].set(r), old, rng))
            return x, (hidden if hidden_at is not None else None), (None if cache is None else KVCache(*new))
        hidden, ks, vs = None, [], []
        for i in range(n):
            layer = self.layers[i]
            kv = None if cache is None else (cache.k[i], cache.v[i])
            if policy is None:
                x, kv = layer(x, cos, sin, mask, kv, index)
            else:
                graphdef, state = nnx.split(layer)
                x, kv, rng = _layer_apply(graphdef, policy, scanned=False)(state, x, cos, sin, mask, kv, index)
                if _draws_randomness(layer):
                    nnx.update(layer, rng)
            if i == hidden_at:
                hidden = x
            if kv is not None:
                ks.append(kv[0])
                vs.append(kv[1])
        return x, hidden, (KVCache(jnp.stack(ks), jnp.stack(vs)) if cache is not None else None)
