"""The jitted training steps: the only place that takes gradients.

``make_two_grad_step`` builds ``step(state, forget_batch, retain_batch) -> (state, metrics)``:

1. ``(L_f, g_f)`` and ``(L_r, g_r)`` are computed separately, each accumulated over ``k``
   micro-batches with ``lax.scan`` (`jax_unlearn.accumulate`: token-weighted by default,
   ``g = sum_j w_j g_j / sum_j w_j``, the gradient of the whole batch's token mean; or
   uniform, ``mean_j g_j``, as the reference);
2. ``TwoTaskGrads(g_f, g_r)`` goes to the optax chain, whose head is a combiner;
3. only trainable parameters are differentiated; the rest and the frozen reference model
   carry no gradient and no optimizer state; the state is donated.

``mode="naive"`` takes one backward pass of ``gamma*L_f + alpha*L_r`` instead (loss
summation, for benchmarks); its chain must not start with a combiner.

``make_step`` is the single-task step (pretraining, fine-tuning): ``step(state, batch)`` with
one loss, the same state, micro-batching, shardings and donation.

>>> import optax, jax_unlearn as ju
>>> from jax_unlearn import objectives, step as st
>>> tx = optax.adamw(1e-3)
>>> defs, state = st.init_state(model, tx)                          # doctest: +SKIP
>>> train = st.make_step(defs, objectives.nll, tx)                  # doctest: +SKIP
>>> state, metrics = train(state, batch)                            # doctest: +SKIP
>>> trained = st.merge_model(defs, state)                           # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax_unlearn import accumulate as acc
from jax_unlearn import head_grad, objectives
from jax_unlearn.combiners import CombinerState, RetainBackward, TwoTaskGrads
from jax_unlearn.objectives import IGNORE, Batch, LossFn, Objective


class TrainState(NamedTuple):
    """Everything a step changes or reads (a pytree; donated to the step)."""

    step: jax.Array  # int32 optimizer steps taken
    params: nnx.State  # trainable parameters
    opt_state: Any  # optax state of the chain over ``params``
    frozen: nnx.State  # non-trainable model variables
    # the reference model's trainable parameters (their starting values; the reference is
    # ``merge(graphdef, ref, frozen)``: the frozen part is shared); None when the objective needs none
    ref: nnx.State | None


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """Static half of the split model: ``merge(graphdef, params, frozen)`` rebuilds it."""

    graphdef: Any


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """How a step runs.

    Attributes:
      micro_batches: ``k``; each batch ``[b, s]`` is split into ``k`` strided micro-batches
        ``[b/k, s]`` (rows ``j, j+k, ...``), so each device's rows divide evenly.
      mode: ``"combined"`` (two gradients, combiner at the head of the chain) or ``"naive"``
        (one backward of ``gamma*L_f + alpha*L_r``; needs ``micro_batches == 1``).
      alpha, gamma: loss weights of the naive mode (the combiners carry their own).
      weighting: how micro-batches are averaged: ``"tokens"`` (by what each loss averages
        over) or ``"uniform"`` (each micro-batch's mean counts once; the reference's).
      forget_every: ``k``; the forget gradient is taken at steps ``0, k, 2k, ...`` and reused in
        between (the lightweight variant: ``1 + 1/k`` backward passes per step on average). The
        chain must be wrapped by `reuse_forget`, whose state keeps the last forget gradient (one
        gradient-sized buffer more, sharded like the parameters, checkpointed with the optimizer
        state). On a reusing step ``forget_loss``/``forget_weight`` are those of the step that took
        the gradient, the objective's other forget metrics are NaN, and ``forget_fresh`` is 0.
      fuse_combine: combine inside the retain backward pass: ``g_f`` first, then the retain
        backward with each parameter wrapped so that its update ``u = rule(g_f, g_r)`` is
        formed as that parameter's ``g_r`` arrives (`jax_unlearn.combiners.RetainBackward`).
        Per-tensor combiners (``sago``, ``weighted_sum``, ``pcgrad(scope="module")``) take it;
        the others take the plain retain gradient first, as without it. Same updates and
        diagnostics; needs ``micro_batches == 1`` (accumulation sums both gradients before
        combining). See docs/benchmarks.md for what it saves on each compiler.
      chunk_head: the retain backward leaves out the output projection (and the embedding),
        whose retain gradient is rebuilt after it a vocabulary chunk at a time and combined
        chunk by chunk into the forget gradient's rows (`jax_unlearn.head_grad`): the step then
        never holds two whole gradients of the largest tensor. Applies with ``sago``,
        ``weighted_sum`` and per-tensor ``pcgrad`` when the retain loss reads the head once through
        chunked log-probs (``logit_chunk``) and the head is trainable; otherwise the step is the
        plain one. Same updates up to float rounding; needs ``micro_batches == 1``.
      sequence_tasks: the retain pass (its forward and backward, and with ``fuse_combine`` or
        ``chunk_head`` the combine) runs as the branch of a ``lax.cond`` whose predicate is always
        true, taken after ``g_f``; the optimizer update stays outside. XLA allocates the zero-initialised buffers of every layer scan (stacked
        residuals, stacked gradients) at the start of the program, so without this the retain
        pass's buffers are live during the forget pass; inside a conditional they exist only
        while it runs. Same updates. It pays without remat (1B on the H100 compiler: 22.2 ->
        17.3 GiB); with remat the residuals are small and the conditional's outputs cannot be
        written in place (``chunk_head``'s saving is lost): docs/benchmarks.md. The run config's
        ``sequence_tasks`` turns it on by default when ``model.remat_policy`` is null.
    """

    micro_batches: int = 1
    mode: Literal["combined", "naive"] = "combined"
    alpha: float = 1.0
    gamma: float = 1.0
    weighting: Literal["tokens", "uniform"] = "tokens"
    fuse_combine: bool = False
    chunk_head: bool = False
    forget_every: int = 1
    sequence_tasks: bool = False

    def __post_init__(self):
        if self.mode not in ("combined", "naive"):
            raise ValueError(f"step mode={self.mode!r} is not supported; expected 'combined' or 'naive'")
        if isinstance(self.micro_batches, bool) or not isinstance(self.micro_batches, int) or self.micro_batches < 1:
            raise ValueError(f"micro_batches must be an integer >= 1, got {self.micro_batches!r}")
        if self.mode == "naive" and self.micro_batches != 1:
            raise ValueError("mode='naive' takes one backward pass per step and supports micro_batches=1 only; "
                             "use the weighted_sum combiner for loss summation with accumulation")
        acc.check_weighting(self.weighting)
        for name in ("fuse_combine", "chunk_head", "sequence_tasks"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.forget_every, bool) or not isinstance(self.forget_every, int) or self.forget_every < 1:
            raise ValueError(f"forget_every must be an integer >= 1, got {self.forget_every!r}")
        if self.mode == "naive" and self.forget_every != 1:
            raise ValueError("mode='naive' takes one backward pass of the summed loss per step; forget_every > 1 "
                             "(reusing the forget gradient) needs mode='combined'")
        for name in ("fuse_combine", "chunk_head"):
            if getattr(self, name) and self.micro_batches != 1:
                raise ValueError(f"{name}=True combines inside the retain backward pass and supports "
                                 f"micro_batches=1 only (got {self.micro_batches}): accumulation sums both "
                                 "gradients over the micro-batches before combining")


class ForgetCache(NamedTuple):
    """The optimizer state of `reuse_forget`: the forget gradient last taken (shaped like the
    parameters), its loss and weight (float32 scalars), and the wrapped chain's state."""

    grad: Any
    loss: jax.Array
    weight: jax.Array
    inner: Any


def reuse_forget(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``tx`` with room in its state for the forget gradient that `make_two_grad_step` reuses
    under ``StepConfig(forget_every=k > 1)`` (`ForgetCache`). The update is ``tx``'s; the step
    writes the cache. ``optax.tree_utils.tree_get`` still finds ``tx``'s diagnostics."""

    inner_tx = optax.with_extra_args_support(tx)  # passes task_weights on where tx takes them

    def init(params):
        return ForgetCache(jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32),
                           jnp.zeros((), jnp.float32), inner_tx.init(params))

    def update(updates, state, params=None, **extra):
        u, inner = inner_tx.update(updates, state.inner, params, **extra)
        return u, state._replace(inner=inner)

    return optax.GradientTransformationExtraArgs(init, update)


def adapter_filter(pattern: str) -> Callable[[tuple, Any], bool]:
    """NNX filter: adapter parameters (``layers.5.mlp.down_proj_lora.lora_a``) of the modules whose
    dotted path (``layers.5.mlp.down_proj``) fully matches ``pattern``."""
    regex = re.compile(pattern)
    return lambda path, _: bool(regex.fullmatch(re.sub(r"_lora\..*$", "", ".".join(str(p) for p in path))))


def path_filter(pattern: str) -> Callable[[tuple, Any], bool]:
    """NNX filter: parameters whose dotted path (``layers.5.mlp.down_proj``) fully matches ``pattern``."""
    regex = re.compile(pattern)
    return lambda path, _: bool(regex.fullmatch(".".join(str(p) for p in path)))


def split_model(model: nnx.Module, objective: Objective | None, train: Any = None
           ) -> tuple[ModelDef, nnx.State, nnx.State, bool]:
    """``(defs, trainable params, frozen variables, whether a reference is kept)`` of ``model``."""
    trainable = None if objective is None else objective.trainable
    if train is not None:
        # with an objective's subset (RMU's layers): the adapters of the modules it names
        flt = nnx.All(nnx.Param, train) if trainable is None else nnx.All(nnx.Param, train, adapter_filter(trainable))
    else:
        if trainable is not None and getattr(getattr(model, "options", None), "scan_layers", False):
            raise ValueError(f"objective {objective.name!r} trains a subset of layers ({trainable!r}); "
                             "that needs a model built with scan_layers=False")
        flt = nnx.Param if trainable is None else nnx.All(nnx.Param, path_filter(trainable))
    graphdef, params, frozen = nnx.split(model, flt, ...)
    if not jax.tree.leaves(params):
        what = f"train={train!r}" if train is not None else f"trainable={trainable!r}"
        raise ValueError(f"{what} matches no parameter of the model; "
                         "parameter paths look like 'layers.5.mlp.down_proj'")
    return ModelDef(graphdef), params, frozen, objective is not None and objective.needs_reference


def state_builder(tx: optax.GradientTransformation, reference: bool) -> Callable[[nnx.State, nnx.State], TrainState]:
    """``build(params, frozen) -> TrainState`` with ``tx``'s fresh optimizer state and, with
    ``reference``, the parameters' starting values as the reference (what `init_state` jits
    with ``out_shardings``)."""

    def build(params, frozen):
        ref = jax.tree.map(jnp.copy, params) if reference else None
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), frozen, ref)

    return build


def abstract_state(model: nnx.Module, tx: optax.GradientTransformation, objective: Objective | None = None,
                   *, train: Any = None) -> tuple[ModelDef, TrainState]:
    """`init_state` without allocating anything: the `TrainState` as ``jax.ShapeDtypeStruct``
    leaves (parameter metadata kept, so `jax_unlearn.sharding.train_state_shardings` applies).
    ``model`` may itself be abstract (``nnx.eval_shape(lambda: CausalLM(...))``)."""
    defs, params, frozen, reference = split_model(model, objective, train)
    return defs, jax.eval_shape(state_builder(tx, reference), params, frozen)


def place_on(tree: Any, shardings: Any) -> Any:
    """``tree`` with each array that lives on other devices than its sharding's put there."""
    def put(x, s):
        here = getattr(x, "sharding", None)
        return x if here is not None and here.device_set == s.device_set else jax.device_put(x, s)

    return jax.tree.map(put, tree, shardings)


def init_state(model: nnx.Module, tx: optax.GradientTransformation, objective: Objective | None = None,
               copy: bool = True, shardings: Callable[[TrainState], Any] | None = None, *, train: Any = None
               ) -> tuple[ModelDef, TrainState]:
    """Splits ``model`` into trainable / frozen parts, keeps the reference's starting values
    when the objective needs one, and initialises ``tx`` on the trainable parameters.

    ``objective`` supplies ``trainable`` (a path regex; None trains every parameter) and
    ``needs_reference``; ``None`` (a single-task step) trains everything, without reference.
    ``train`` (an NNX filter, e.g. ``nnx.LoRAParam`` for the adapters of
    `jax_unlearn.models.add_lora`) overrides ``trainable``. The reference model is the frozen
    variables plus a copy of the trainable parameters, so it costs only what trains.
    The step donates its state, so with ``copy=True`` the state gets its own buffers and
    ``model`` stays usable; ``copy=False`` hands the model's buffers over (no extra memory,
    but ``model`` must not be used afterwards).

    ``shardings`` maps the abstract state (`abstract_state`) to a `TrainState` of shardings,
    e.g. ``functools.partial(jax_unlearn.sharding.train_state_shardings, mesh=mesh, tx=tx)``.
    Then the copies, the reference and the optimizer state are made by one jitted function
    with those ``out_shardings``: each device only ever holds its shards (give it a model
    loaded sharded, ``load_hf(..., shardings=mesh)``, and no device holds the whole model).
    """
    defs, params, frozen, reference = split_model(model, objective, train)
    build = state_builder(tx, reference)
    if shardings is not None:
        target = shardings(jax.eval_shape(build, params, frozen))
        donate = () if copy else (0, 1)
        # a model on other devices (e.g. loaded unsharded onto one) moves onto the mesh first
        params, frozen = place_on(params, target.params), place_on(frozen, target.frozen)
        return defs, jax.jit(build, out_shardings=target, donate_argnums=donate)(params, frozen)
    if copy:
        params, frozen = jax.tree.map(jnp.copy, (params, frozen))
    return defs, build(params, frozen)


def global_batch(batch: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Host arrays -> global arrays placed by ``sharding``; every process holds the whole batch
    and supplies its own shards."""
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx]) for k, v in batch.items()}


def add_reference_logprobs(model: nnx.Module, data: Mapping[str, np.ndarray], *, batch_size: int = 8,
                           logit_chunk: int | None = None, sharding: jax.sharding.Sharding | None = None
                           ) -> dict[str, np.ndarray]:
    """``data`` (a tokenised set: ``input_ids``, ``attention_mask``, ``labels``, each ``[N, s]``)
    plus the column ``ref_logp`` (`jax_unlearn.objectives.REF_LOGP`): float32 ``[N]``, each
    row's ``log p_model(y)`` summed over its label tokens (`objectives.sequence_logprob`).

    Run once on the forget set with the start model before training, it lets NPO
    (``npo(reference="precompute")``) train without a resident reference model; a set with
    DPO's alternate answers (``alt_*`` columns) also gets ``alt_ref_logp``, theirs. One jitted
    forward pass per ``batch_size`` rows (the last batch padded with label-free rows);
    ``sharding`` (e.g. `jax_unlearn.sharding.batch_sharding`) splits each batch's rows over a
    mesh, with the model's activation constraints on; the model is used where it lives
    (load it sharded for a large one). ``logit_chunk`` as in the objective.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    graphdef, state = nnx.split(model)

    def row_logp(state, batch):
        return objectives.sequence_logprob(nnx.merge(graphdef, state), batch, logit_chunk)

    fn = jax.jit(on_mesh(row_logp, mesh_of(sharding)))  # placed where its arguments are
    out = {**data, objectives.REF_LOGP: _sequence_logprobs(fn, state, data, "", batch_size, sharding)}
    if objectives.ALT + "input_ids" in data:  # DPO's alternate answers: their reference log-probs too
        out[objectives.ALT + objectives.REF_LOGP] = _sequence_logprobs(fn, state, data, objectives.ALT, batch_size,
                                                                        sharding)
    return out


def _sequence_logprobs(fn, state, data: Mapping[str, np.ndarray], prefix: str, batch_size: int, sharding
                       ) -> np.ndarray:
    """``fn(state, rows)`` over the columns ``prefix + input_ids / attention_mask / labels`` of
    ``data``, ``batch_size`` rows at a time (the last batch padded with label-free rows): ``[N]``."""
    n = len(data[prefix + "input_ids"])
    keys = [k for k in ("input_ids", "attention_mask", "labels") if prefix + k in data]
    out = np.empty((n,), np.float32)
    for start in range(0, n, batch_size):
        rows = {k: np.asarray(data[prefix + k][start:start + batch_size]) for k in keys}
        got = len(rows["input_ids"])
        if got < batch_size:  # pad: no attention, no labels -> log-prob 0, dropped below
            pad = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE}
            rows = {k: np.concatenate([v, np.full((batch_size - got, *v.shape[1:]), pad[k], v.dtype)])
                    for k, v in rows.items()}
        if sharding is not None:
            rows = global_batch(rows, sharding)
        out[start:start + got] = np.asarray(jax.device_get(fn(state, rows)))[:got]
    return out


@functools.partial(jax.jit, static_argnames=("graphdef", "stacked"))
def _grad_norms(graphdef, params, rest, batch, stacked: tuple[bool, ...]):
    """``[b, 3]``: per row, the mean over parameter tensors of the gradient's 1-, 2- and inf-norm."""
    loss = objectives.nll_loss()

    def row_loss(params, row):
        one = jax.tree.map(lambda x: x[None], row)
        return loss(nnx.merge(graphdef, params, rest), one)[0]

    def norms(g, st):
        x = jnp.abs(g.astype(jnp.float32))
        x = x.reshape(x.shape[0], -1) if st else x.reshape(1, -1)  # one row per HF tensor
        return jnp.stack([jnp.sum(x, 1), jnp.sqrt(jnp.sum(jnp.square(x), 1)), jnp.max(x, 1)], axis=1)

    def one(row):
        grads = jax.tree.leaves(jax.grad(row_loss)(params, row))
        return jnp.mean(jnp.concatenate([norms(g, st) for g, st in zip(grads, stacked)]), axis=0)

    return jax.lax.map(one, batch)


def per_example_grad_norms(model: nnx.Module, batch: Mapping[str, Any], *, p: float = 2.0) -> np.ndarray:
    """``[b]`` float64: for each row, the mean over parameter tensors of the ``p``-norm (1, 2 or
    inf, over the tensor's elements) of the gradient of the row's token-mean NLL
    (`jax_unlearn.objectives.nll_loss` on that row alone) -- the statistic of open-unlearning's
    GradNorm membership-inference attack (``src/evals/metrics/mia/gradnorm.py``).

    ``batch``: ``input_ids``, ``attention_mask`` and ``labels`` (``[b, s]``, ``-100`` = no loss).
    Every `nnx.Param` is differentiated; a tensor is one Hugging Face parameter: a leaf, or each
    layer's slice of a ``scan_layers`` stack. A row without label tokens scores 0. The rows are
    differentiated one after another (``lax.map``) in one jitted call, so only one row's
    gradient exists at a time; the model is not changed.
    """
    if p not in (1, 2, float("inf")):
        raise ValueError(f"p must be 1, 2 or inf, got {p!r}")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    scanned = bool(getattr(getattr(model, "options", None), "scan_layers", False))
    stacked = tuple(scanned and path[0] == "layers" for path, _ in nnx.to_flat_state(params))
    batch = {k: jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "labels") if k in batch}
    out = np.asarray(jax.device_get(_grad_norms(graphdef, params, rest, batch, stacked)), np.float64)
    return out[:, {1: 0, 2: 1}.get(p, 2)]


def merge_model(defs: ModelDef, state: TrainState, copy: bool = True) -> nnx.Module:
    """The current model (trainable and frozen parts merged).

    The step donates ``state``: with ``copy=False`` the model shares the state's buffers and
    dies ("Array has been deleted") after the next step; ``copy=True`` (the default) gives it
    buffers of its own, so it stays valid while training goes on.
    """
    params, frozen = (state.params, state.frozen)
    if copy:
        params, frozen = jax.tree.map(jnp.copy, (params, frozen))
    return nnx.merge(defs.graphdef, params, frozen)


def _micro(batch: Batch, k: int) -> Batch:
    """``[b, ...] -> [k, b/k, ...]`` with micro-batch ``j`` = rows ``j, j+k, ...``."""

    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by micro_batches={k}")
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def _mean_grads(loss_fn: Callable, params: Any, batch: Batch, config: StepConfig, grad_shardings: Any = None):
    """``(loss, metrics, grads)`` of ``loss_fn(params, batch) -> (loss, metrics)`` averaged over
    ``config.micro_batches`` micro-batches as ``config.weighting`` says. ``metrics["weight"]``
    is the summed weight of the loss (tokens or sequences); the accumulated gradients are
    constrained to ``grad_shardings`` (the parameters' shardings) when given."""
    vg = jax.value_and_grad(loss_fn, has_aux=True)
    k = config.micro_batches
    if k == 1:
        (loss, metrics), g = vg(params, batch)
        return loss, metrics, g
    constrain = (lambda t: t) if grad_shardings is None else (
        lambda t: jax.lax.with_sharding_constraint(t, grad_shardings))

    def body(carry, mb):
        g_acc, lm_acc, total_weight = carry
        (loss, metrics), g = vg(params, mb)
        w = acc.micro_batch_weight(config.weighting, metrics["weight"])
        g_acc = acc.mean_add(g_acc, g, w)
        g_acc = g_acc._replace(total=constrain(g_acc.total))
        lm_acc = acc.mean_add(lm_acc, (loss, metrics), w)
        return (g_acc, lm_acc, total_weight + metrics["weight"]), None

    first = jax.tree.map(lambda x: x[0], _micro(batch, k))
    (_, m_shape), g_shape = jax.eval_shape(vg, params, first)
    init = (acc.mean_start(g_shape), acc.mean_start((jax.ShapeDtypeStruct((), jnp.float32), m_shape)),
            jnp.zeros((), jnp.float32))
    (g_acc, lm_acc, total_weight), _ = jax.lax.scan(body, init, _micro(batch, k))
    loss, metrics = acc.mean_value(lm_acc, lm_acc.total)
    metrics = dict(metrics, weight=total_weight)
    return loss, metrics, acc.mean_value(g_acc, params)


def mesh_of(*shardings: Any) -> jax.sharding.AbstractMesh | None:
    """The mesh (as an ``AbstractMesh`` with ``Auto`` axes) of the first ``NamedSharding`` among
    the leaves of ``shardings``; None when there is none."""
    for s in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)):
        if isinstance(s, jax.sharding.NamedSharding):
            mesh = s.mesh.abstract_mesh
            return mesh.update(axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))
    return None


def on_mesh(fn: Callable, mesh: jax.sharding.AbstractMesh | None) -> Callable:
    """``fn`` traced with ``mesh`` set, so that the model's activation constraints
    (`jax_unlearn.models.partitioning.constrain`) apply; ``fn`` itself when ``mesh`` is None."""
    if mesh is None:
        return fn

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh):
            return fn(*args, **kwargs)

    return wrapped


def _jit(step, state_shardings, batch_sharding, n_batches: int, donate: bool):
    kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate else ()}
    if state_shardings is not None or batch_sharding is not None:
        kwargs["in_shardings"] = (state_shardings, *([batch_sharding] * n_batches))
        kwargs["out_shardings"] = (state_shardings, None)
    return jax.jit(on_mesh(step, mesh_of(batch_sharding, state_shardings)), **kwargs)


def _advance_rngs(frozen: nnx.State, step: jax.Array, salt: int) -> nnx.State:
    """``frozen`` with every RNG stream's count moved to ``count + step * 2**16 + salt``: a model
    that draws randomness (LoRA dropout in train mode) gets fresh masks at every step and for
    each task, as a function of the step alone (a resumed run draws the same ones)."""
    offset = step.astype(jnp.uint32) * jnp.uint32(1 << 16) + jnp.uint32(salt)

    def move(v):
        return v.replace(v.get_value() + offset.astype(v.get_value().dtype)) if isinstance(v, nnx.RngCount) else v

    return jax.tree.map(move, frozen, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _bind(defs: ModelDef, loss_fn: LossFn, state: TrainState, salt: int = 0) -> Callable:
    """``loss_fn(model, batch, ref)`` as a function of ``(params, batch)`` for ``state`` (``salt``
    tells the tasks' random draws apart, see `_advance_rngs`)."""
    frozen = _advance_rngs(state.frozen, state.step, salt)

    def f(params, batch):  # fresh Variables at this trace level: dropout advances their RNG counts here
        model = nnx.merge(defs.graphdef, params, frozen, copy=True)
        ref = None if state.ref is None else nnx.merge(defs.graphdef, state.ref, frozen, copy=True)
        return loss_fn(model, batch, ref)

    return f


def make_step(
    defs: ModelDef,
    loss: LossFn,
    tx: optax.GradientTransformation,
    config: StepConfig = StepConfig(),
    state_shardings: Any = None,
    batch_sharding: Any = None,
    donate: bool = True,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted single-task step ``step(state, batch) -> (state, metrics)``.

    Args:
      defs: from `init_state` (e.g. ``init_state(model, tx)``: every parameter trains).
      loss: ``(model, batch, ref) -> (loss, metrics)`` with ``metrics["weight"]``, e.g.
        `jax_unlearn.objectives.nll`.
      tx: any optax chain over the trainable parameters (no combiner).
      config, state_shardings, batch_sharding, donate: as in `make_two_grad_step`.

    Metrics: ``loss``, ``weight``, the loss's own metrics and ``grad_norm``.
    """
    if config.mode != "combined":
        raise ValueError("make_step takes one loss: StepConfig(mode='naive') is for make_two_grad_step")

    def step(state: TrainState, batch: Batch):
        shardings = None if state_shardings is None else state_shardings.params
        loss_value, metrics, g = _mean_grads(_bind(defs, loss, state), state.params, batch, config, shardings)
        updates, opt_state = tx.update(g, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, loss=loss_value, grad_norm=optax.tree.norm(g))
        return state._replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return _jit(step, state_shardings, batch_sharding, 1, donate)


def make_two_grad_step(
    defs: ModelDef,
    objective: Objective,
    tx: optax.GradientTransformation,
    config: StepConfig = StepConfig(),
    state_shardings: Any = None,
    batch_sharding: Any = None,
    donate: bool = True,
) -> Callable[[TrainState, Batch, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Returns the jitted ``step(state, forget_batch, retain_batch) -> (state, metrics)``.

    Args:
      defs, objective: from `init_state` and `jax_unlearn.objectives`.
      tx: an optax chain; in ``"combined"`` mode its head is a combiner (``ju.sago()``, ...).
      config: micro-batching, weighting and mode (`StepConfig`).
      state_shardings: a `TrainState` of shardings (`jax_unlearn.sharding.train_state_shardings`);
        ``None`` leaves placement to jit.
      batch_sharding: sharding of every batch array ``[b, s]``.
      donate: donate the input state's buffers to the output.

    Metrics: ``forget_loss``, ``retain_loss``, ``forget_weight``/``retain_weight`` (tokens or
    sequences), the objectives' own metrics prefixed ``forget_``/``retain_``, the combiner's
    diagnostics (``conflict_fraction``, ``cos_forget_retain``, ``cos_update_retain``,
    ``forget_norm``, ``retain_norm``, ``update_norm``) or, in naive mode, ``grad_norm``.
    """

    def forget_grads(state: TrainState, fb: Batch):
        """``(L_f, metrics, g_f)``: taken, or with ``forget_every = k > 1`` taken at every k-th
        step and otherwise read from the `ForgetCache` (``lax.cond``: only one branch runs)."""
        shardings = None if state_shardings is None else state_shardings.params

        def fresh():
            return _mean_grads(_bind(defs, objective.forget, state), state.params, fb, config, shardings)

        if config.forget_every == 1:
            return fresh()
        cache = state.opt_state
        if not isinstance(cache, ForgetCache):
            raise ValueError(f"StepConfig(forget_every={config.forget_every}) reuses the forget gradient, kept in "
                             "the optimizer state: wrap the chain with jax_unlearn.step.reuse_forget(tx) "
                             f"(its state is a {type(cache).__name__})")
        loss_s, m_s, _ = jax.eval_shape(fresh)

        def reuse():
            m = {k: jnp.full(v.shape, jnp.nan, v.dtype) for k, v in m_s.items()}
            m["weight"] = cache.weight.astype(m_s["weight"].dtype)
            return cache.loss.astype(loss_s.dtype), m, cache.grad

        return jax.lax.cond(state.step % config.forget_every == 0, fresh, reuse)

    def combined(state: TrainState, fb: Batch, rb: Batch):
        shardings = None if state_shardings is None else state_shardings.params
        lf, mf, gf = forget_grads(state, fb)
        when = (state.step >= 0) if config.sequence_tasks else None  # always true, not foldable
        if config.fuse_combine or config.chunk_head:
            retain = RetainPass(_bind(defs, objective.retain, state, 1), state.params, rb,
                                taps=config.fuse_combine, chunk_head=config.chunk_head, when=when)
            updates, opt_state = _update_fused(tx, gf, retain, mf, state)
            (lr, mr) = retain.result
        else:
            grads = functools.partial(_mean_grads, _bind(defs, objective.retain, state, 1), state.params, rb, config,
                                      shardings)
            lr, mr, gr = grads() if when is None else _branch(grads, when)
            extra = {"task_weights": (mf["weight"], mr["weight"])}  # for two_task_multi_steps(weighting="tokens")
            if not isinstance(tx, optax.GradientTransformationExtraArgs):
                extra = {}
            updates, opt_state = tx.update(TwoTaskGrads(gf, gr), state.opt_state, state.params, **extra)
        metrics = _task_metrics(lf, mf, lr, mr)
        if config.forget_every > 1:
            opt_state = opt_state._replace(grad=gf, loss=jnp.asarray(lf, jnp.float32),
                                           weight=jnp.asarray(mf["weight"], jnp.float32))
            metrics["forget_fresh"] = (state.step % config.forget_every == 0).astype(jnp.float32)
        for name in CombinerState._fields:
            metrics[name] = optax.tree_utils.tree_get(opt_state, name, jnp.nan)
        return updates, opt_state, metrics

    def naive(state: TrainState, fb: Batch, rb: Batch):
        forget_fn, retain_fn = _bind(defs, objective.forget, state), _bind(defs, objective.retain, state, 1)

        def total(p):
            lf, mf = forget_fn(p, fb)
            lr, mr = retain_fn(p, rb)
            return config.gamma * lf + config.alpha * lr, (lf, mf, lr, mr)

        (_, (lf, mf, lr, mr)), g = jax.value_and_grad(total, has_aux=True)(state.params)
        updates, opt_state = tx.update(g, state.opt_state, state.params)
        metrics = _task_metrics(lf, mf, lr, mr)
        metrics["grad_norm"] = optax.tree.norm(g)
        return updates, opt_state, metrics

    body = combined if config.mode == "combined" else naive

    def step(state: TrainState, forget_batch: Batch, retain_batch: Batch):
        updates, opt_state, metrics = body(state, forget_batch, retain_batch)
        params = optax.apply_updates(state.params, updates)
        return state._replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return _jit(step, state_shardings, batch_sharding, 2, donate)


class RetainPass(RetainBackward):
    """`jax_unlearn.combiners.RetainBackward` for the step: ``TwoTaskGrads(forget=g_f,
    retain=RetainPass(...))`` lets a per-tensor combiner form its update inside the retain
    backward pass (``StepConfig(fuse_combine=True)``).

    ``loss_fn(params, batch) -> (loss, aux)`` is the retain loss. `gradient` takes the plain
    gradient ``g_r`` (what every combiner that needs whole-tree sums first does). `combine`
    runs the backward with each parameter leaf ``p`` wrapped in an identity whose backward
    turns the arriving cotangent ``g_r`` of that leaf into ``rule(i, g_f[i], g_r) -> (u_i,
    stats_i)``: the gradient of the wrapped loss is the update ``u`` itself, and the per-tensor
    diagnostic sums leave as the cotangents of zero "probe" inputs, so the combiner is never
    handed a retain gradient tree (what the compilers make of that: docs/benchmarks.md).
    ``taps=False`` (``StepConfig(chunk_head=True, fuse_combine=False)``) takes ``g_r`` plainly and
    applies ``rule`` to each leaf after the backward; ``chunk_head`` rebuilds the head's leaves by
    vocabulary chunks (`combine`). Whichever runs records ``(loss, aux)`` in ``result``.
    Not a pytree: it lives only inside one trace of the step.
    """

    def __init__(self, loss_fn: Callable, params: Any, batch: Any, taps: bool = True, chunk_head: bool = False,
                 when: jax.Array | None = None):
        self.loss_fn, self.params, self.batch = loss_fn, params, batch
        self.taps, self.chunk_head, self.when = taps, chunk_head, when
        self.result: tuple | None = None

    def _run(self, fn: Callable[[], Any]) -> Any:
        return fn() if self.when is None else _branch(fn, self.when)

    def gradient(self) -> Any:
        """``g_r``, shaped like the params."""
        (loss, aux), g = self._run(lambda: jax.value_and_grad(self.loss_fn, has_aux=True)(self.params, self.batch))
        self.result = (loss, aux)
        return g

    def combine(self, forget: Any, rule: Callable, chunking: Callable | None = None) -> tuple[list, list]:
        """``(update leaves, per-leaf stats)`` with ``rule(i, f_i, r_i) -> (u_i, stats_i)`` applied
        to each leaf ``i`` of ``forget`` (the params' structure): with ``taps``, as the backward
        produces ``r_i``; without, after it.

        With ``chunk_head`` and a ``chunking(i) -> (sums, apply)`` for the output projection's and
        the embedding's leaves (`jax_unlearn.combiners.make_combiner`), those leaves are left out
        of the backward and combined a vocabulary chunk at a time after it
        (`jax_unlearn.head_grad`), their whole retain gradient never held; where that does not
        apply (`head_grad.trace_plan`) they are treated like every leaf."""
        loss, aux, u, stats = self._run(functools.partial(self._combine, forget, rule, chunking))
        self.result = (loss, aux)
        return u, stats

    def _combine(self, forget: Any, rule: Callable, chunking: Callable | None) -> tuple:
        p_leaves, treedef = jax.tree_util.tree_flatten(self.params)
        f_leaves = treedef.flatten_up_to(forget)
        plan = head_grad.trace_plan(self.loss_fn, self.params, self.batch, _head_names(self.params)) \
            if chunking is not None and self.chunk_head else None
        if plan is not None and any(chunking(i) is None for i in plan.parts):
            plan = None
        deferred = {} if plan is None else plan.parts
        probes = [jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                               jax.eval_shape(lambda f, i=i: rule(i, f, f)[1], f)) if self.taps else ()
                  for i, f in enumerate(f_leaves)]
        head_probes = {} if plan is None else {k: jnp.zeros(s.shape, s.dtype) for k, s in plan.probes.items()}

        def tapped_loss(p_leaves, probes, head_probes):
            taps = [p if i in deferred or not self.taps else _tap(functools.partial(rule, i))(p, f, q)
                    for i, (p, f, q) in enumerate(zip(p_leaves, f_leaves, probes))]
            params = jax.tree_util.tree_unflatten(treedef, taps)
            if plan is None:
                return self.loss_fn(params, self.batch)
            with head_grad.recording(head_grad.Tape(head_probes)) as tape:
                loss, aux = self.loss_fn(params, self.batch)
            return loss, (aux, tape.saved())

        (loss, aux), (u, stats, d_head) = jax.value_and_grad(tapped_loss, argnums=(0, 1, 2), has_aux=True)(
            p_leaves, probes, head_probes)
        u, stats = list(u), list(stats)
        if not self.taps:  # u holds g_r: combine each leaf now (the deferred ones below)
            for i, (f, r) in enumerate(zip(f_leaves, u)):
                if i not in deferred:
                    u[i], stats[i] = rule(i, f, r)
        if plan is not None:
            aux, saved = aux
            for i, parts in deferred.items():
                grad = functools.partial(head_grad.chunk_gradient, p_leaves[i], saved, d_head["logp"],
                                         d_head.get("x0"), parts)
                tokens = (saved["h"] if "h" in saved else saved["ids"]).shape
                u[i], stats[i] = head_grad.combine_leaf(p_leaves[i], f_leaves[i], *chunking(i), grad,
                                                        tokens[0] * tokens[1])
        return loss, aux, u, stats


def _head_names(params: Any) -> list[str | None]:
    """Per leaf of ``params``: ``"embed_tokens"``/``"lm_head"`` for the model's top-level leaves of
    those names (what `jax_unlearn.head_grad` may rebuild), else None."""
    names = []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        key = getattr(path[0], "key", None) if path else None
        names.append(key if key in ("embed_tokens", "lm_head") and len(path) <= 2 else None)
    return names


def _tap(leaf_rule: Callable) -> Callable:
    """``tap(p, f, probe) = p`` whose backward maps the cotangent ``r`` of ``p`` to
    ``leaf_rule(f, r) = (u, stats)``: ``u`` for ``p``, nothing for ``f``, ``stats`` for ``probe``."""

    @jax.custom_vjp
    def tap(p, f, probe):
        del f, probe
        return p

    def fwd(p, f, probe):
        del probe
        return p, f

    def bwd(f, r):
        u, stats = leaf_rule(f, r)
        return u.astype(r.dtype), jnp.zeros_like(f), stats

    tap.defvjp(fwd, bwd)
    return tap


def _update_fused(tx: optax.GradientTransformation, gf: Any, retain: RetainPass, mf: dict, state: TrainState):
    """``tx.update`` on ``TwoTaskGrads(g_f, retain)``: the chain's head runs the retain backward
    (`RetainPass`). ``task_weights`` (for ``two_task_multi_steps(weighting="tokens")``) are read
    lazily: the retain loss's weight exists once that backward has run."""
    if not isinstance(tx, optax.GradientTransformationExtraArgs):
        out = tx.update(TwoTaskGrads(gf, retain), state.opt_state, state.params)
    else:
        class Weights:
            def __iter__(self):
                if retain.result is None:
                    retain.gradient()
                return iter((mf["weight"], retain.result[1]["weight"]))

        out = tx.update(TwoTaskGrads(gf, retain), state.opt_state, state.params, task_weights=Weights())
    if retain.result is None:
        raise ValueError("fuse_combine/chunk_head=True: the optax chain never took the retain gradient; its head must be "
                         "a combiner (jax_unlearn.sago(), ...)")
    return out


def _branch(fn: Callable[[], Any], true: jax.Array) -> Any:
    """``fn()`` as the taken branch of ``lax.cond(true, fn, zeros)`` (``true`` is a traced scalar
    that is always true, so XLA cannot fold the conditional away): the buffers ``fn`` allocates
    exist only while the conditional runs, i.e. after its operands (what ``fn`` reads) exist.
    The other branch returns zeros of ``fn``'s output shapes and never runs."""
    shapes = jax.eval_shape(fn)
    return jax.lax.cond(true, fn, lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))


def _task_metrics(lf, mf, lr, mr) -> dict[str, jax.Array]:
    metrics = {"forget_loss": lf, "retain_loss": lr, "forget_weight": mf["weight"], "retain_weight": mr["weight"]}
    metrics.update({f"forget_{k}": v for k, v in mf.items() if k != "weight"})
    metrics.update({f"retain_{k}": v for k, v in mr.items() if k != "weight"})
    return metrics
