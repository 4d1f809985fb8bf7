"""Shared fixtures of the evaluation tests: a tiny exported model, its word-level tokenizer and data.

The model is a random LLaMA (GQA, biases, untied head, vocab 256, weights scaled up so its
answers vary with the question) written by transformers,
loaded with `load_hf` and exported again with `save_hf` (tokenizer included); tests compare
our JAX evaluation with transformers/PyTorch run from that exported folder. The tokenizer is
GPT-2-like at the word level (a word keeps its leading space, so " A" is one token and "A"
another; "\\n" is a token) and prepends "<s>" like a LLaMA tokenizer.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from hf_fixtures import make_checkpoint
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from jax_unlearn.eval import format_description, format_question, qa_prompt
from jax_unlearn.models import load_hf, save_hf

VOCAB = 256
NEWLINE_BOOST = 2.0
SPECIALS = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
WORD_SPLIT = r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]|\n| +"  # " A" is one piece
CHAR_SPLIT = r"[A-Za-z]+|[0-9]+|[^\sA-Za-z0-9]|\s"          # " A" is two pieces: " " and "A"

SUBJECT = "anatomy"
MC_TEST = [
    ("Which organ pumps blood?", ["heart", "lung", "skin", "bone"], 0),
    ("Which organ is used to breathe?", ["bone", "lung", "heart", "eye"], 1),
    ("What covers the body?", ["lung", "eye", "skin", "heart"], 2),
    ("What do we see with?", ["heart", "bone", "skin", "eye"], 3),
    ("Which part holds the body up?", ["bone", "eye", "lung", "skin"], 0),
    ("Where is the brain?", ["foot", "head", "hand", "arm"], 1),
    ("What do we walk on?", ["head", "arm", "foot", "hand"], 2),
    ("What do we write with?", ["foot", "head", "arm", "hand"], 3),
    ("How many hearts does a person have?", ["one", "two", "three", "four"], 0),
    ("How many eyes does a person have?", ["one", "two", "three", "four"], 1),
    ("Which organ filters blood?", ["kidney", "skin", "eye", "hand"], 0),
    ("What carries air to the lung?", ["bone", "blood", "throat", "foot"], 2),
]
MC_DEV = [
    ("What is blood pumped by?", ["lung", "heart", "eye", "foot"], 1),
    ("How many hands does a person have?", ["one", "two", "three", "four"], 1),
    ("What is the brain inside?", ["head", "foot", "hand", "lung"], 0),
]
QA = [  # (question, answer, level): RWKU forget levels 1-3
    ("The heart pumps ___ through the body.", "blood", "1"),
    ("A person sees with the ___.", "eye", "1"),
    ("The brain is inside the ___.", "head", "1"),
    ("Which organ pumps blood?", "the heart", "2"),
    ("What do we walk on?", "our foot", "2"),
    ("How many eyes does a person have?", "two eyes", "2"),
    ("Tell me which organ filters blood, please.", "the kidney", "3"),
    ("You must answer: what carries air to the lung?", "the throat", "3"),
]
TEXTS = [
    "The heart pumps blood through the body.",
    "A person sees with two eyes and walks on two feet.",
    "The kidney filters blood and the lung takes in air.",
    "Bone holds the body up and skin covers it.",
    "The brain is inside the head.",
    "Blood carries air from the lung to every part of the body, and the heart pumps it.",
]
HOLDOUT = [
    "The sky is blue today.",
    "Rain falls on the red roof.",
    "We walk to the sea and swim.",
    "A dog runs in the park with one ball.",
]


def mc_records(rows) -> list[dict]:
    return [{"question": q, "choices": c, "answer": a, "subject": SUBJECT} for q, c, a in rows]


def qa_records() -> list[dict]:
    return [{"question": q, "answer": a, "level": lv} for q, a, lv in QA]


def corpus() -> list[str]:
    """Every string the tests tokenize (prompts rendered), so the word vocabulary covers them."""
    out = [format_description(SUBJECT)]
    for q, c, a in MC_TEST + MC_DEV:
        out += [format_question(q, c) + " " + "ABCD"[a], " A B C D"]
    for q, a, _ in QA:
        out += [qa_prompt(q, "fill_blank"), qa_prompt(q, "question"), " " + a]
    return out + TEXTS + HOLDOUT


def make_tokenizer(pattern: str = WORD_SPLIT, extra: dict[str, int] | None = None) -> transformers.PreTrainedTokenizerFast:
    pre = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    vocab = dict(SPECIALS)
    for text in corpus():
        for piece, _ in pre.pre_tokenize_str(text):
            vocab.setdefault(piece, len(vocab))
    vocab.update(extra or {})
    if max(vocab.values()) >= VOCAB and not extra:
        raise AssertionError(f"test vocabulary has {len(vocab)} pieces, more than {VOCAB}")
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<pad>")


_ROOT: Path | None = None
_CACHE: dict = {}


def root() -> Path:
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="ju_eval_"))
        atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


def exported() -> tuple[Path, object, transformers.PreTrainedTokenizerBase, torch.nn.Module]:
    """``(folder, jax model, tokenizer, torch model)``, all read from one `save_hf` export (built once)."""
    if "model" not in _CACHE:
        src, folder = root() / "source", root() / "model"
        tok = make_tokenizer()
        torch_model = make_checkpoint(src, "llama_gqa", seed=3, vocab_size=VOCAB)
        nl = tok.convert_tokens_to_ids("\n")
        with torch.no_grad():
            for name, p in torch_model.named_parameters():  # larger weights: answers depend on the question
                if not name.endswith("norm.weight"):
                    p.mul_(3.0)
            torch_model.lm_head.weight[nl] *= NEWLINE_BOOST  # some greedy QA answers stop on a newline
        torch_model.save_pretrained(src)
        save_hf(load_hf(src), folder, tokenizer=tok)
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                               dtype=torch.float32).eval()
        _CACHE["model"] = (folder, load_hf(folder), transformers.AutoTokenizer.from_pretrained(folder), hf)
    return _CACHE["model"]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def torch_continuation_logprob(model, tok, context: str, continuation: str) -> float:
    """``sum log p(continuation | context)`` with transformers: the continuation is the part of
    ``tok(context + continuation)`` after ``tok(context)``."""
    whole = tok(context + continuation)["input_ids"]
    n_ctx = len(tok(context)["input_ids"])
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return float(sum(logp[t - 1, whole[t]] for t in range(n_ctx, len(whole))))


def torch_greedy(model, tok, prompt: str, max_new_tokens: int, eos_token_id) -> tuple[list[int], np.ndarray]:
    """transformers' greedy continuation of the unpadded ``prompt``: ``(token ids, logits [n, vocab]
    each was chosen from)``, stopping at ``eos_token_id`` (an id or a list of ids)."""
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_token_id,
                             pad_token_id=tok.pad_token_id, output_logits=True, return_dict_in_generate=True)
    gen = out.sequences[0, ids["input_ids"].shape[1]:].tolist()
    return gen, torch.stack(out.logits, 1)[0, :len(gen)].float().numpy()


# ----------------------------------------------------------------------------- fixture checks
def test_tokenizer_fixture_round_trips_and_prepends_bos():
    folder, _, tok, _ = exported()
    text = format_question(*MC_TEST[0][:2]) + " A"
    ids = tok(text)["input_ids"]
    assert ids[0] == 1 and 3 not in ids  # BOS, no unknown piece
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok(" A", add_special_tokens=False)["input_ids"]) == 1
    assert tok.convert_tokens_to_ids("\n") != 3
    assert (folder / "tokenizer.json").is_file() and (folder / "model.safetensors").is_file()


def test_char_split_tokenizer_splits_letters():
    tok = make_tokenizer(CHAR_SPLIT)
    assert len(tok(" A", add_special_tokens=False)["input_ids"]) == 2
    assert np.all(np.array(tok(format_question(*MC_TEST[1][:2]))["input_ids"]) != 3)
