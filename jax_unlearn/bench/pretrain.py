"""Pretrains the benchmark's tiny LLaMA on its world and caches it in the user cache.

The cache folder (``$JAX_UNLEARN_CACHE`` or ``~/.cache/jax_unlearn``) holds one Hugging Face
folder per benchmark config under ``bench/<key>``, where ``key`` hashes the world, model and
pretraining configs: the same config is reused, any change trains a new model. A folder is
written under a temporary name and renamed when complete, so an interrupted build leaves no
half-written model behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

from jax_unlearn.bench.checks import require_positive
from jax_unlearn.bench.evaluate import evaluate
from jax_unlearn.bench.tokens import BOS, PAD, hf_tokenizer, probe_rows, text_rows, train_tokenizer
from jax_unlearn.bench.world import World, WorldConfig, make_world
from jax_unlearn.models import CausalLM, ModelConfig, load_hf, save_hf
from jax_unlearn.objectives import nll

log = logging.getLogger(__name__)

SEQ = 16  # tokens per row: every benchmark sentence fits
CACHE_VERSION = 1  # bump when the generator or the training changes what a key produces


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """The tiny LLaMA (defaults: 4 layers, d=64, ~0.27M parameters with the 205-token vocabulary)."""

    hidden: int = 64
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256

    def __post_init__(self):
        require_positive({f"model.{n}": getattr(self, n) for n in ("hidden", "layers", "heads", "kv_heads",
                                                                   "intermediate")})
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"model.hidden={self.hidden} must divide by model.heads={self.heads}, "
                             f"and model.heads by model.kv_heads={self.kv_heads}")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """AdamW with linear warmup and cosine decay over ``max_steps``; stops early at the first
    evaluation (every ``eval_every`` steps) where forget, retain, held-out and general
    accuracy are all >= ``target``."""

    max_steps: int = 6000
    batch_size: int = 64
    lr: float = 5e-3
    warmup: int = 200
    weight_decay: float = 0.0
    eval_every: int = 500
    target: float = 0.98
    seed: int = 0

    def __post_init__(self):
        require_positive({f"pretrain.{n}": getattr(self, n) for n in ("max_steps", "batch_size", "eval_every")})
        if not 0 <= self.warmup < self.max_steps:
            raise ValueError(f"pretrain.warmup={self.warmup} must lie in [0, pretrain.max_steps={self.max_steps})")
        require_positive({"pretrain.lr": self.lr}, "> 0")


@dataclasses.dataclass
class Pretrained:
    model: CausalLM
    tokenizer: object  # tokenizers.Tokenizer
    world: World
    path: Path
    info: dict  # steps, seconds, accuracies at the end of pretraining
    cached: bool


def cache_root() -> Path:
    return Path(os.environ.get("JAX_UNLEARN_CACHE") or Path.home() / ".cache" / "jax_unlearn")


def cache_key(world: WorldConfig, size: ModelSize, pre: PretrainConfig) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "world": dataclasses.asdict(world), "size": dataclasses.asdict(size),
                       "pretrain": dataclasses.asdict(pre)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_config(size: ModelSize, vocab: int) -> ModelConfig:
    return ModelConfig(model_type="llama", vocab_size=vocab, hidden_size=size.hidden,
                       intermediate_size=size.intermediate, num_hidden_layers=size.layers,
                       num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
                       head_dim=size.hidden // size.heads, max_position_embeddings=SEQ,
                       bos_token_id=BOS, eos_token_id=2, pad_token_id=PAD)


def _train(world: World, tok, size: ModelSize, cfg: PretrainConfig, progress: bool) -> tuple[CausalLM, dict]:
    from tqdm import tqdm

    rows = text_rows(tok, world.pretraining_texts(), SEQ)
    probes = probe_rows(tok, world.probes())
    model = CausalLM(model_config(size, tok.get_vocab_size()), rngs=nnx.Rngs(cfg.seed))
    graphdef, params = nnx.split(model)
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup, cfg.max_steps)
    tx = optax.adamw(schedule, weight_decay=cfg.weight_decay)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        loss, g = jax.value_and_grad(lambda p: nll(nnx.merge(graphdef, p), batch)[0])(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(cfg.seed)
    n = len(rows["input_ids"])
    order, cursor = rng.permutation(n), 0
    start, acc, done = time.perf_counter(), {}, 0
    bar = tqdm(total=cfg.max_steps, desc=f"pretraining world {world.config.seed}", unit="step", disable=not progress)
    for done in range(1, cfg.max_steps + 1):
        if cursor + cfg.batch_size > n:
            order, cursor = rng.permutation(n), 0
        idx = order[cursor: cursor + cfg.batch_size]
        cursor += cfg.batch_size
        params, opt_state, loss = step(params, opt_state, {k: v[idx] for k, v in rows.items()})
        bar.update()
        if done % cfg.eval_every == 0 or done == cfg.max_steps:
            acc = evaluate(nnx.merge(graphdef, params), probes)
            log.info("pretrain step %d: loss %.4f, %s", done, float(loss),
                     ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
            if all(acc[f"{g}_acc"] >= cfg.target for g in ("forget", "retain", "heldout", "general")):
                break
    bar.close()
    info = {"steps": done, "seconds": round(time.perf_counter() - start, 1), "final_loss": float(loss), **acc}
    return nnx.merge(graphdef, params), info


def pretrained(world_cfg: WorldConfig = WorldConfig(), size: ModelSize = ModelSize(),
               pre: PretrainConfig = PretrainConfig(), cache: Path | None = None,
               progress: bool = False) -> Pretrained:
    """The pretrained benchmark model of these configs: loaded from the cache, or trained and
    saved there (``save_hf`` with the tokenizer, plus ``world.json`` and ``pretrain.json``)."""
    from tokenizers import Tokenizer

    world = make_world(world_cfg)
    folder = (cache or cache_root()) / "bench" / cache_key(world_cfg, size, pre)
    if (folder / "pretrain.json").is_file():
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        info = json.loads((folder / "pretrain.json").read_text())
        return Pretrained(load_hf(folder), tok, world, folder, info, cached=True)
    tok = train_tokenizer(world.all_texts())
    model, info = _train(world, tok, size, pre, progress)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        save_hf(model, tmp / "m", hf_tokenizer(tok))
        for f in (tmp / "m").iterdir():
            f.rename(tmp / f.name)
        (tmp / "m").rmdir()
        (tmp / "world.json").write_text(json.dumps(dataclasses.asdict(world_cfg), indent=1))
        (tmp / "pretrain.json").write_text(json.dumps({"size": dataclasses.asdict(size),
                                                       "pretrain": dataclasses.asdict(pre), **info}, indent=1))
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / "pretrain.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same key first: keep theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Pretrained(model, tok, world, folder, info, cached=False)
