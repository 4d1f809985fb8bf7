"""A workspace for command-line tests: a tiny Hugging Face model folder (with tokenizer),
data files and a run config (``run.yaml``: 3 GradDiff steps, weighted sum)."""

from __future__ import annotations

import json
from pathlib import Path


def make_workspace(root: Path) -> Path:
    """Writes the workspace into ``root`` (model ``base/``, ``forget.jsonl``, ``retain.jsonl``,
    ``mc.jsonl``, ``qa.jsonl``, ``holdout.jsonl``, ``run.yaml``) and returns ``root``."""
    from flax import nnx
    from tokenizer_fixtures import make_tokenizer

    from jax_unlearn import data
    from jax_unlearn.models import CausalLM, ModelConfig, save_hf

    tok = data.load_tokenizer(make_tokenizer(root / "tok"))
    cfg = ModelConfig(model_type="llama", vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=4)
    save_hf(CausalLM(cfg, rngs=nnx.Rngs(0)), root / "base", tok)
    write_run_files(root)
    write = lambda name, rows: (root / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    write("mc.jsonl", [{"question": "Where do spores survive?", "choices": ["soil", "air", "water", "fire"],
                        "answer": 0, "subject": "biology"},
                       {"question": "Capital of France?", "choices": ["Rome", "Paris"], "answer": 1}])
    write("qa.jsonl", [{"question": "Who attends Hogwarts?", "answer": "Harry Potter", "level": "1"},
                       {"question": "What is the capital of France?", "answer": "Paris", "level": "2"}])
    write("holdout.jsonl", [{"text": t} for t in ["Bananas ripen faster in paper bags.", "Rivers carve valleys."]])
    return root


def write_run_files(root: Path) -> None:
    """``forget.jsonl`` (16 texts), ``retain.jsonl`` (16 QA pairs) and ``run.yaml`` (model
    ``root/base``, output ``root/run``) in ``root``."""
    write = lambda name, rows: (root / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    write("forget.jsonl", [{"text": t} for t in ["Anthrax spores survive for decades in soil.",
                                                 "The spores of anthrax survive in soil for decades."] * 8])
    write("retain.jsonl", [{"question": "What is the capital of France?", "answer": "Paris"},
                           {"question": "Who attends Hogwarts?", "answer": "Harry Potter"}] * 8)
    (root / "run.yaml").write_text(f"""\
output_dir: {root / 'run'}
batch_size: 8
max_steps: 3
save_every: 2
keep: 3
progress: false
model:
  path: {root / 'base'}
data:
  forget: {root / 'forget.jsonl'}
  retain: {root / 'retain.jsonl'}
  max_length: 16
optim:
  lr: 0.01
  warmup_ratio: 0.1
combiner:
  name: weighted_sum
objective:
  name: grad_diff
""")
