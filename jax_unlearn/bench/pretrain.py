"""Pretrains the benchmark's tiny LLaMA on its world, and its gold model, and caches them.

The *gold* model is exact unlearning: the same recipe and seed on everything but the forget
people (`World.gold_texts`), stopped by the same rule without the forget group. Unlearned models
are judged against it (`jax_unlearn.bench.evaluate`).

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

from flax import nnx

from jax_unlearn import step as st
from jax_unlearn.bench.config import ModelSize, PretrainConfig
from jax_unlearn.bench.evaluate import evaluate
from jax_unlearn.bench.tokens import BOS, PAD, SEQ, probe_rows, text_rows, train_tokenizer
from jax_unlearn.bench.world import World, WorldConfig, make_world
from jax_unlearn.config import OptimConfig, build_optimizer
from jax_unlearn.data import EpochBatches, load_tokenizer
from jax_unlearn.models import CausalLM, ModelConfig, load_hf, save_hf
from jax_unlearn.objectives import nll
from jax_unlearn.train import Every, run_steps

log = logging.getLogger(__name__)

CACHE_VERSION = 4  # bump when the generator or the training changes what a key produces (4: the model's
# activation-sharding constraints and masked-sum label log-probs change float32 rounding)
TARGET_GROUPS = ("forget", "retain", "heldout", "general")  # pretraining stops when all reach the target


@dataclasses.dataclass
class Pretrained:
    model: CausalLM
    tokenizer: object  # transformers.PreTrainedTokenizerFast
    world: World
    path: Path
    info: dict  # steps, seconds, accuracies at the end of pretraining
    cached: bool


def cache_root() -> Path:
    return Path(os.environ.get("JAX_UNLEARN_CACHE") or Path.home() / ".cache" / "jax_unlearn")


def cache_key(world: WorldConfig, size: ModelSize, pre: PretrainConfig, gold: bool = False) -> str:
    blob = {"v": CACHE_VERSION, "world": dataclasses.asdict(world), "size": dataclasses.asdict(size),
            "pretrain": dataclasses.asdict(pre)}
    if gold:
        blob["gold"] = True
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def model_config(size: ModelSize, vocab: int) -> ModelConfig:
    return ModelConfig(model_type="llama", vocab_size=vocab, hidden_size=size.hidden,
                       intermediate_size=size.intermediate, num_hidden_layers=size.layers,
                       num_attention_heads=size.heads, num_key_value_heads=size.kv_heads, max_position_embeddings=SEQ,
                       bos_token_id=BOS, eos_token_id=2, pad_token_id=PAD)


def _train(world: World, tok, size: ModelSize, cfg: PretrainConfig, progress: bool,
           gold: bool = False) -> tuple[CausalLM, dict]:
    """Pretrains with the library's single-task step and loop: seeded epochs of ``batch_size``
    rows, AdamW with linear warmup and cosine decay, evaluation every ``eval_every`` steps,
    stopping once every group of `TARGET_GROUPS` (the gold model: all but ``forget``) reaches
    the target."""
    from tqdm import tqdm

    texts, groups = (world.gold_texts(), TARGET_GROUPS[1:]) if gold else (world.pretraining_texts(), TARGET_GROUPS)
    rows = text_rows(tok, texts, name="pretraining")
    probes = probe_rows(tok, world.probes())
    model = CausalLM(model_config(size, len(tok)), rngs=nnx.Rngs(cfg.seed))
    tx = build_optimizer(OptimConfig(lr=cfg.lr, schedule="cosine", warmup_steps=cfg.warmup,
                                     weight_decay=cfg.weight_decay, clip_norm=None), cfg.max_steps)
    defs, state = st.init_state(model, tx, copy=False)
    step = st.make_step(defs, nll, tx)
    data = EpochBatches(rows, cfg.batch_size, cfg.seed, "pretraining")
    start, last = time.perf_counter(), {}

    def check(done: int, state, metrics) -> bool:
        last.update(evaluate(st.merge_model(defs, state, copy=False), probes), loss=float(metrics["loss"]))
        log.info("pretrain step %d: %s", done, ", ".join(f"{k} {v:.3f}" for k, v in last.items() if v is not None))
        return all(last[f"{g}_acc"] >= cfg.target for g in groups)

    what = "gold model of world" if gold else "pretraining world"
    bar = tqdm(total=cfg.max_steps, desc=f"{what} {world.config.seed}", unit="step", disable=not progress)
    state, done, _ = run_steps(step, state, lambda t: (data(t),), 0, cfg.max_steps, [Every(cfg.eval_every, check)], bar)
    bar.close()
    info = {"steps": done, "seconds": round(time.perf_counter() - start, 1), "final_loss": last.pop("loss"), **last}
    return st.merge_model(defs, state, copy=False), info


def pretrained(world_cfg: WorldConfig = WorldConfig(), size: ModelSize = ModelSize(),
               pre: PretrainConfig = PretrainConfig(), cache: Path | None = None,
               progress: bool = False, gold: bool = False) -> Pretrained:
    """The pretrained benchmark model of these configs (``gold``: the model that never saw the
    forget people): loaded from the cache, or trained and saved there (``save_hf`` with the
    tokenizer, plus ``world.json`` and ``pretrain.json``)."""
    world = make_world(world_cfg)
    folder = (cache or cache_root()) / "bench" / cache_key(world_cfg, size, pre, gold)
    if (folder / "pretrain.json").is_file():
        info = json.loads((folder / "pretrain.json").read_text())
        return Pretrained(load_hf(folder), load_tokenizer(folder), world, folder, info, cached=True)
    tok = train_tokenizer(world.all_texts())
    model, info = _train(world, tok, size, pre, progress, gold)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        save_hf(model, tmp / "m", tok)
        for f in (tmp / "m").iterdir():
            f.rename(tmp / f.name)
        (tmp / "m").rmdir()
        (tmp / "world.json").write_text(json.dumps(dataclasses.asdict(world_cfg), indent=1))
        (tmp / "pretrain.json").write_text(json.dumps({"size": dataclasses.asdict(size), "gold": gold,
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
