"""The schema of a run: typed, frozen dataclasses, one per YAML section.

`TrainConfig` is what the training loop (`jax_unlearn.train`) needs: the loop's top-level keys
and the sections ``mesh`` (`jax_unlearn.sharding.MeshConfig`), ``optim``, ``combiner``,
``objective``, ``select``, ``stop_when`` and ``lora``. `RunConfig`, the schema of a
``jax-unlearn unlearn`` file, is a `TrainConfig` plus where the inputs come from: ``model``
(`ModelSection`), ``data`` (`DataSection`) and ``eval`` (`EvalSection`). Combiner and
objective names come from the registries (`jax_unlearn.combiners.COMBINERS`,
`jax_unlearn.objectives.OBJECTIVES`).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from omegaconf import MISSING

from jax_unlearn import sharding as sh
from jax_unlearn.combiners import COMBINERS
from jax_unlearn.objectives import OBJECTIVES
from jax_unlearn.registry import Registry


class ConfigError(ValueError):
    """A run configuration that cannot work; the message names the key and what it allows."""


def _known(registry: Registry, section: str, name: str) -> None:
    if name not in registry.names():
        raise ValueError(f"{section}.name={name!r} is not supported; expected one of {', '.join(registry.names())}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup and a decay schedule, after global-norm clipping.

    ``warmup_steps`` (when set) overrides ``warmup_ratio``, whose steps are
    ``ceil(warmup_ratio * total_steps)`` as in the Hugging Face Trainer.

    ``skip_nonfinite`` (used by `build_tx`): 0 (the default) leaves non-finite updates to the
    loop, which stops the run at the first one; ``N > 0`` wraps the optimizer in
    ``optax.apply_if_finite(max_consecutive_errors=N)``: a non-finite combined gradient is
    skipped (no update, optimizer state kept), up to ``N`` in a row.
    ``moment_dtype`` stores both Adam moments in that dtype (``None``: the parameters' dtype,
    optax's default). ``bfloat16`` halves the optimizer state of float32 parameters
    (float32 master weights, ``model.dtype: float32`` with ``model.compute_dtype: bfloat16``)
    and ``float32`` keeps exact moments for bfloat16 parameters. The second moment in
    bfloat16 rounds its small per-step changes (``(1-b2) g^2`` against ``nu``): on unit
    Gaussian gradients with ``b2=0.999`` it reads 0.4% high after 200 steps, 2% after 500,
    6% after 1000 (docs/benchmarks.md), so the steps shrink slightly in long runs.
    """

    lr: float = 1e-5
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_ratio: float = 0.0
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    skip_nonfinite: int = 0
    moment_dtype: Literal["float32", "bfloat16"] | None = None


@dataclasses.dataclass(frozen=True)
class CombinerConfig:
    """Which combiner heads the chain (a name of `combiners.COMBINERS`) and its settings. Each key
    applies to the combiners whose factory takes it (a key set away from its default for another
    combiner is an error naming it): ``scope`` to ``pcgrad``, ``agree`` to ``sago``; ``c`` and
    ``norm_eps`` to ``cagrad``; ``norm_eps`` and ``reg_eps`` to ``upgrad`` and ``dual_proj``;
    ``scale_mode`` to ``aligned_mtl``; ``max_norm`` and ``update_weights_every`` to ``nash_mtl``;
    ``beta`` and ``eps`` to ``grad_vac``; ``rank_rtol`` to ``con_fig``; ``moving_avg`` and
    ``cos_clip`` to ``gru`` (docs/reference.md, the combiner zoo).

    Weights that change during the run (`jax_unlearn.combiners.adaptive`), for every combiner:
    ``weight_schedule`` ``linear``/``cosine`` moves ``alpha`` to ``alpha_end`` and ``gamma`` to
    ``gamma_end`` (null: unchanged) over the run's steps; ``adapt: conflict`` scales ``gamma`` by
    the agreement ratio of the measured conflict fractions (``adapt_power``, ``adapt_ema``,
    ``adapt_floor``). Not both at once."""

    name: str = "sago"
    alpha: float = 1.0
    gamma: float = 1.0
    scope: Literal["module", "global"] = "module"
    agree: Literal["forget", "sum"] = "forget"
    diagnostics: bool = True
    c: float = 0.4
    norm_eps: float = 1e-4
    reg_eps: float = 1e-4
    scale_mode: Literal["min", "median", "rmse"] = "min"
    max_norm: float = 1.0
    update_weights_every: int = 1
    beta: float = 0.5
    eps: float = 1e-8
    rank_rtol: float | None = None
    moving_avg: float = 0.8
    cos_clip: float | None = None
    weight_schedule: Literal["constant", "linear", "cosine"] = "constant"
    alpha_end: float | None = None
    gamma_end: float | None = None
    adapt: Literal["none", "conflict"] = "none"
    adapt_power: float = 2.0
    adapt_ema: float = 0.9
    adapt_floor: float = 0.1

    def __post_init__(self):
        _known(COMBINERS, "combiner", self.name)


#: CombinerConfig keys that wrap the combiner (`jax_unlearn.combiners.adaptive`) instead of going to its factory
WEIGHT_KEYS = ("weight_schedule", "alpha_end", "gamma_end", "adapt", "adapt_power", "adapt_ema", "adapt_floor")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Which objective (a name of `objectives.OBJECTIVES`) and its settings: ``retain`` (``nll``,
    ``kl`` or ``none``) and ``logit_chunk`` for the log-likelihood objectives, ``beta`` for
    NPO/SimNPO/DPO/IdkDPO/UNDIAL/WGA (this key's default, 0.1, applies to all of them:
    open-unlearning's UNDIAL uses 10, its WGA 1), ``delta`` for SimNPO, ``beta1``/``beta2`` for
    SatImp, ``ignore_first`` for CE-U, ``reference`` for NPO/DPO/IdkDPO (``resident``: a frozen
    copy of the start model; ``precompute``: its sequence log-probs computed once into the
    forget set, one model held), ``layer``/``steering``/``trainable``/``seed`` for RMU; ``compat``
    for all (``"open_unlearning"``: the reference code's loss semantics, see `jax_unlearn.objectives`)."""

    name: str = "grad_diff"
    retain: Literal["nll", "kl", "none"] = "nll"
    beta: float = 0.1
    beta1: float = 5.0
    beta2: float = 1.0
    ignore_first: int = 1
    delta: float = 0.0
    layer: int = 7
    steering: float = 2.0
    trainable: str | None = None
    seed: int = 0
    logit_chunk: int | None = None
    compat: Literal["open_unlearning"] | None = None
    reference: Literal["resident", "precompute"] = "resident"

    def __post_init__(self):
        _known(OBJECTIVES, "objective", self.name)


@dataclasses.dataclass(frozen=True)
class SelectConfig:
    """Which state a run exports: with ``metric`` (an evaluation metric name such as
    ``mc/wmdp_bio/accuracy``, evaluated every ``eval.every`` steps) the evaluated step whose
    metric is best (``mode`` ``min`` or ``max``; ties keep the earlier step), else the last step."""

    metric: str | None = None
    mode: Literal["min", "max"] = "max"


@dataclasses.dataclass(frozen=True)
class StopConfig:
    """Ends a run early, as finished, at the first evaluation where ``metric`` <= ``below`` or
    >= ``above`` (one of the two), e.g. forget accuracy at chance."""

    metric: str | None = None
    below: float | None = None
    above: float | None = None


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Parameter-efficient unlearning: with ``rank`` set, LoRA adapters
    (`jax_unlearn.models.add_lora`) on the ``targets`` projections are the only parameters that
    train (RMU's ``objective.trainable`` then picks the adapters of the modules it names); the
    NPO/KL reference is the base model (the adapters' starting values: B = 0), not a second copy
    of the base weights. ``dropout`` acts on the adapters' inputs during training only."""

    rank: int | None = None
    alpha: float = 16.0
    targets: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "v_proj"])
    dropout: float = 0.0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One unlearning run."""

    output_dir: str
    batch_size: int = 8
    micro_batches: int = 1
    micro_batch_weighting: Literal["tokens", "uniform"] = "tokens"
    forget_every: int = 1  # take the forget gradient every k steps and reuse it in between (StepConfig)
    chunk_head: bool = False  # the head's retain gradient rebuilt by vocabulary chunks (StepConfig, head_grad)
    # the retain pass in a conditional after the forget gradient (StepConfig); null: on without remat
    sequence_tasks: bool | None = None
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs when set
    seed: int = 0
    save_every: int = 50
    keep: int = 2
    log_every: int = 1
    mode: Literal["combined", "naive"] = "combined"
    export: bool = True
    progress: bool = True
    mesh: sh.MeshConfig = sh.MeshConfig()
    optim: OptimConfig = OptimConfig()
    combiner: CombinerConfig = CombinerConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    select: SelectConfig = SelectConfig()
    stop_when: StopConfig = StopConfig()
    lora: LoraConfig = LoraConfig()


# ----------------------------------------------------------------------------- the run file

Dtype = Literal["float32", "bfloat16", "float16"]
DTYPES: tuple[str, ...] = typing.get_args(Dtype)


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """The starting model: a local Hugging Face folder and `load_hf` options."""

    path: str = MISSING
    tokenizer: str | None = None  # a Hugging Face tokenizer folder; default: ``path``
    dtype: Dtype = "float32"
    compute_dtype: Dtype | None = None
    attention_impl: Literal["xla", "cudnn"] | None = None
    scan_layers: bool = False
    remat_policy: str | None = None

    def options(self) -> dict[str, Any]:
        """The ``**model_options`` of `jax_unlearn.models.load_hf`."""
        return dict(compute_dtype=self.compute_dtype, attention_impl=self.attention_impl,
                    scan_layers=self.scan_layers, remat_policy=self.remat_policy)


@dataclasses.dataclass(frozen=True)
class DataSection:
    """Forget and retain files (``.jsonl``/``.json`` text or QA records, ``.txt``), see `data.load_set`;
    ``chunk_bos``: packed chunks get the reference's masked BOS (`data.TokenizeOptions`);
    ``template``: QA pairs become open-unlearning's rows for that model (its ``template_args``:
    ``apply_chat_template``, ``system_prompt``, ``date_string``, ``user_start_tag``, ...; see
    `jax_unlearn.eval.ou_scoring.PromptTemplate`) instead of ``Question: ...\nAnswer: ...``;
    ``idk``: IdkDPO's "I don't know" responses, one per line (`data.read_idk`; only with
    ``objective.name: idk_dpo``, which needs it)."""

    forget: str = MISSING
    retain: str = MISSING
    max_length: int = 512
    mode: Literal["auto", "pack", "truncate"] = "auto"
    forget_format: Literal["auto", "text", "qa"] = "auto"
    retain_format: Literal["auto", "text", "qa"] = "auto"
    chunk_bos: bool = False
    template: dict[str, Any] | None = None
    idk: str | None = None


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """Evaluation of the exported model after the run and, with ``every``, during it (every
    ``every`` steps and at step 0: rows ``eval/<metric>`` in ``metrics.jsonl``, which
    ``select.metric`` and ``stop_when.metric`` name; see `jax_unlearn.eval.suite`). All optional."""

    mc: list[str] = dataclasses.field(default_factory=list)  # multiple-choice files
    qa: list[str] = dataclasses.field(default_factory=list)  # QA probe files (ROUGE-L recall)
    mia_forget: str | None = None  # texts the model was asked to forget ...
    mia_holdout: str | None = None  # ... and texts it never saw: MIA AUROC between them
    perplexity: list[str] = dataclasses.field(default_factory=list)  # text files (perplexity)
    every: int | None = None  # evaluate during the run every this many steps
    num_fewshot: int = 0  # solved examples before each mc question, from ``fewshot``
    fewshot: str | None = None  # multiple-choice file of solved examples (e.g. the dev split)
    subject: str | None = None
    batch_size: int = 8
    max_new_tokens: int = 32
    # robustness attacks on the final evaluation (`jax_unlearn.eval.robustness`): the same metrics after
    # fine-tuning a copy on `relearn` (part of the forget set) / `relearn_benign` texts, of each
    # `quantize` scheme (int8, int4, int4_g128, ...), and the paraphrase files' metrics
    relearn: str | None = None
    relearn_benign: str | None = None
    relearn_steps: int = 10
    relearn_lr: float = 1e-5
    relearn_batch_size: int = 4
    relearn_max_length: int = 128
    relearn_seed: int = 0
    quantize: list[str] = dataclasses.field(default_factory=list)
    paraphrase_mc: list[str] = dataclasses.field(default_factory=list)
    paraphrase_qa: list[str] = dataclasses.field(default_factory=list)

    def enabled(self) -> bool:
        return bool(self.mc or self.qa or self.mia_forget or self.mia_holdout or self.perplexity
                    or self.relearn or self.relearn_benign or self.quantize or self.paraphrase_mc or self.paraphrase_qa)

    def metric_names(self) -> tuple[str, ...]:
        """The metric names an evaluation of these files gives (`jax_unlearn.eval.suite`)."""
        from jax_unlearn.eval.suite import metric_names

        return metric_names(self.mc, self.qa, self.mia_forget is not None, self.perplexity)

    def suite(self) -> Any:
        """The `jax_unlearn.eval.suite.EvalSuite` of this section (reads and checks the files)."""
        from jax_unlearn.eval.suite import EvalSuite

        return EvalSuite.of(self)


@dataclasses.dataclass(frozen=True)
class RunConfig(TrainConfig):
    """One ``jax-unlearn unlearn`` run: the `TrainConfig` keys plus ``model``, ``data`` and ``eval``."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)

    def train_config(self) -> TrainConfig:
        """The `TrainConfig` that `train.unlearn` takes."""
        return TrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)})


# ----------------------------------------------------------------------------- schema helpers

