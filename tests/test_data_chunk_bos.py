"""``chunk_bos``: packed chunks rebuilt as the reference builds them, and the keys of a paper
config (``objective.compat``, ``micro_batch_weighting``, ``data.chunk_bos``) through the CLI.

The reference rows are restated from sustech-nlp/SAGO @2363ee7: ``src/data/pretraining.py:85-90``
(``PretrainingDataset.__getitem__``), ``src/data/utils.py:166-183``
(``preprocess_pretraining_instance`` with an empty prefix) and ``src/data/collators.py``
(right padding with the pad id, labels with -100).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from tokenizers import processors

from jax_unlearn import cli
from jax_unlearn import data as D
from jax_unlearn.data import DataError, TokenizeOptions

IGNORE = -100
TEXTS = ["Café naïve — 東京 hello world", "The capital of France is Paris.", "Anthrax spores survive for decades."]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tokenizer_fixtures import make_tokenizer

    return D.load_tokenizer(make_tokenizer(tmp_path_factory.mktemp("tok")))


def with_template(tok, single: str):
    """The tokenizer with another special-token template (``"$A"``: no BOS)."""
    other = copy.deepcopy(tok)
    other.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(t, tok.convert_tokens_to_ids(t)) for t in ("<s>", "</s>") if t in single])
    return other


def reference_item(tokenizer, chunk_tokens, max_length):
    """``PretrainingDataset.__getitem__`` -> ``preprocess_pretraining_instance(tokenizer, "", text, max_length)``."""
    chunk_text = tokenizer.decode(chunk_tokens, skip_special_tokens=True)
    full_seq_ids = tokenizer("" + chunk_text, add_special_tokens=True)["input_ids"]
    prefix_ids = tokenizer("", add_special_tokens=True)["input_ids"]
    prefix_len = len(prefix_ids)
    full_seq_ids = full_seq_ids[: prefix_len + max_length]
    len_matched = prefix_len
    if len_matched == 0:
        len_matched = 1
    labels = [IGNORE] * len_matched + full_seq_ids[len_matched:]
    return {"input_ids": full_seq_ids, "labels": labels, "attention_mask": [1] * len(full_seq_ids)}


def reference_rows(tokenizer, texts, max_length, width):
    """Every chunk's reference item, right-padded to ``width`` (the collator pads to the longest
    row of a micro-batch; padding is masked, so only the width differs)."""
    tokens = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    chunks = [tokens[i:i + max_length] for i in range(0, len(tokens), max_length)]
    if len(chunks[-1]) < 2:
        chunks.pop()
    pad = tokenizer.pad_token_id
    items = [reference_item(tokenizer, c, max_length) for c in chunks]
    ids = np.array([it["input_ids"] + [pad] * (width - len(it["input_ids"])) for it in items])
    labels = np.array([it["labels"] + [IGNORE] * (width - len(it["labels"])) for it in items])
    am = np.array([it["attention_mask"] + [0] * (width - len(it["attention_mask"])) for it in items])
    return ids, labels, am


@pytest.mark.parametrize("template, extra", [("<s> $A", 1), ("$A", 0), ("<s> $A </s>", 2)])
@pytest.mark.parametrize("max_length", [4, 7, 16])
def test_chunk_bos_rows_are_the_references(tok, template, extra, max_length):
    tokenizer = with_template(tok, template)
    out = D.pack_texts(TEXTS, tokenizer, max_length, TokenizeOptions(chunk_bos=True))
    width = max_length + extra  # the tokenizer's prefix (what it makes of "") plus one chunk
    ids, labels, am = reference_rows(tokenizer, TEXTS, max_length, width)
    assert out["input_ids"].shape == ids.shape == (len(ids), width)
    np.testing.assert_array_equal(out["input_ids"], ids)
    np.testing.assert_array_equal(out["labels"], labels)
    np.testing.assert_array_equal(out["attention_mask"], am)
    assert np.all(out["labels"][:, : max(extra, 1)] == IGNORE)  # the BOS (or the first token) is never a target


def test_chunk_bos_re_encodes_the_chunk_text(tok):
    """A chunk cut inside a multi-byte character decodes to U+FFFD and re-encodes differently
    (the reference trains on that); without chunk_bos the chunk's tokens are kept as they are."""
    plain = D.pack_texts(TEXTS, tok, 4)
    bos = D.pack_texts(TEXTS, tok, 4, TokenizeOptions(chunk_bos=True))
    first = plain["input_ids"][0].tolist()
    assert bos["input_ids"][0, 0] == tok.bos_token_id and tok.bos_token_id not in plain["input_ids"]
    assert "\ufffd" in tok.decode(first, skip_special_tokens=True)
    assert bos["input_ids"][0, 1:].tolist() != first
    assert bos["input_ids"][0, 1:].tolist() == tok(tok.decode(first), add_special_tokens=False)["input_ids"][:4]


def test_chunk_bos_applies_to_packed_text_only(tmp_path, tok):
    texts = tmp_path / "t.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "Capital of France?", "answer": "Paris"}) + "\n")
    opts = TokenizeOptions(chunk_bos=True)
    assert D.load_set(texts, tok, 8, options=opts)["input_ids"].shape[1] == 9
    with pytest.raises(DataError, match=r"chunk_bos=True rebuilds packed chunks, but the t.jsonl set is not packed"):
        D.load_set(texts, tok, 8, mode="truncate", options=opts)
    with pytest.raises(DataError, match=r"but the retain set holds QA pairs"):
        D.load_unlearning_sets(texts, qa, tok, 8, options=opts)


# ----------------------------------------------------------------------------- a paper config's keys, end to end


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from flax import nnx
    from tokenizer_fixtures import make_tokenizer

    from jax_unlearn.models import CausalLM, ModelConfig, save_hf

    root = tmp_path_factory.mktemp("paper_keys")
    tok = D.load_tokenizer(make_tokenizer(root / "tok"))
    cfg = ModelConfig(model_type="llama", vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=4)
    save_hf(CausalLM(cfg, rngs=nnx.Rngs(0)), root / "base", tok)
    for name, texts in (("forget.jsonl", TEXTS * 16), ("retain.jsonl", ["Rivers carve valleys over time."] * 8)):
        (root / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (root / "qa.jsonl").write_text(json.dumps({"question": "Capital of France?", "answer": "Paris"}) + "\n")
    return root


def test_paper_semantics_keys_run_end_to_end(workspace, capsys):
    root = workspace
    (root / "run.yaml").write_text(f"""\
output_dir: {root / 'run'}
batch_size: 16
micro_batches: 2
micro_batch_weighting: uniform
max_steps: 1
progress: false
export: false
model:
  path: {root / 'base'}
data:
  forget: {root / 'forget.jsonl'}
  retain: {root / 'retain.jsonl'}
  max_length: 16
  chunk_bos: true
combiner:
  name: pcgrad
  alpha: 1.0
  gamma: 1.0
objective:
  name: simnpo
  beta: 0.5
  delta: 0.1
  compat: open_unlearning
""")
    assert cli.main(["unlearn", str(root / "run.yaml")]) == 0
    out = capsys.readouterr().out
    assert "rows of 17 tokens" in out and "1/1 steps" in out  # 16-token chunks plus the BOS
    saved = (root / "run" / "config.yaml").read_text()
    assert "compat: open_unlearning" in saved and "chunk_bos: true" in saved and "micro_batch_weighting: uniform" in saved
    metrics = json.loads((root / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert np.isfinite(metrics["forget_loss"]) and metrics["forget_weight"] == 16  # compat SimNPO: every row
    # chunk_bos on a QA set is refused with the set named (exit status 2)
    assert cli.main(["unlearn", str(root / "run.yaml"), f"data.retain={root / 'qa.jsonl'}",
                     f"output_dir={root / 'run2'}"]) == 2
    assert "chunk_bos=True" in capsys.readouterr().err
    assert cli.main(["unlearn", str(root / "run.yaml"), "objective.compat=hf", f"output_dir={root / 'run3'}"]) == 2
    assert "objective.compat" in capsys.readouterr().err
