"""Measures multiple-choice evaluation speed: N four-choice questions through `evaluate_multiple_choice`.

A random-init LLaMA of the given shape, a word-level tokenizer (``tokenizers``; words keep
their leading space, so `` A`` is one token and all four choices are scored in one forward
pass per question) and N synthetic MMLU-style questions (12-30 word stems, four 1-4 word
choices, a subject header). The timed call is the whole public path -- prompt building,
tokenisation, batching, jitted scoring, argmax and accuracy:
``evaluate_multiple_choice(model, tokenizer, questions, ...)``. It runs twice: the first
("cold") call includes JIT compilation (one program per padded length bucket), the second
("warm") call reuses the compiled programs. Wall time by ``time.perf_counter``; the results
are NumPy arrays, so the device work has finished when the call returns.

    python scripts/bench_eval.py                          # 1,000 questions, zero-shot, tiny model
    python scripts/bench_eval.py --num-fewshot 5          # MMLU-style 5-shot prompts
    python scripts/bench_eval.py --size 20m --batch-size 64
    python scripts/bench_eval.py --rows-per-choice        # 4 rows per question (general path), for comparison
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_unlearn.eval import evaluate_multiple_choice
from jax_unlearn.eval.multiple_choice import build_prompts
from jax_unlearn.eval.scoring import bucket_length
from jax_unlearn.eval.tokens import encode
from jax_unlearn.models import CausalLM, ModelConfig

SIZES = {
    "tiny": dict(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True),
    "20m": dict(vocab_size=8192, hidden_size=384, intermediate_size=1536, num_hidden_layers=8,
                num_attention_heads=6, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True),
}


def make_tokenizer(n_words: int, seed: int):
    """Word-level tokenizer over ``n_words`` random lowercase words (each with and without a
    leading space), letters, digits and punctuation; ``<s>`` prepended like LLaMA."""
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    rng = np.random.default_rng(seed)
    words = sorted({"".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(3, 9)))
                    for _ in range(n_words)})
    header = "The following are multiple choice questions with answers about bench Answer".split()
    pieces = ["<pad>", "<s>", "</s>", "<unk>", "\n", " ", *".:?()", *"ABCD", *(" " + c for c in "ABCD")]
    for w in words + header:
        pieces += [w, " " + w]
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]|\n| +"), "isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                               unk_token="<unk>", pad_token="<pad>")
    return tok, words


def make_questions(words: list[str], n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    pick = lambda k: " ".join(rng.choice(words, k))  # noqa: E731
    return [{"question": pick(rng.integers(12, 31)).capitalize() + "?",
             "choices": [pick(rng.integers(1, 5)) for _ in range(4)],
             "answer": int(rng.integers(0, 4)), "subject": "bench"} for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=1000)
    ap.add_argument("--size", default="tiny", choices=sorted(SIZES))
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-fewshot", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows-per-choice", action="store_true",
                    help="score one row per choice (single_pass=False) instead of one pass per question")
    a = ap.parse_args()

    cfg = ModelConfig(model_type="llama", max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0, **SIZES[a.size])
    model = CausalLM(cfg, rngs=nnx.Rngs(a.seed))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    tok, words = make_tokenizer(min(cfg.vocab_size // 2 - 40, 2000), a.seed)
    questions = make_questions(words, a.questions, a.seed + 1)
    dev = make_questions(words, 5, a.seed + 2) if a.num_fewshot else None

    _, prompts = build_prompts(questions, num_fewshot=a.num_fewshot, fewshot=dev)
    lengths = np.array([len(encode(tok, p)) for p in prompts])
    buckets = sorted({bucket_length(int(lengths[i].max())) for i in
                      np.array_split(np.argsort(-lengths, kind="stable"), -(-len(lengths) // a.batch_size))})

    times, result = [], None
    for _ in range(2):
        t0 = time.perf_counter()
        result = evaluate_multiple_choice(model, tok, questions, num_fewshot=a.num_fewshot, fewshot=dev,
                                          batch_size=a.batch_size, single_pass=False if a.rows_per_choice else None)
        times.append(time.perf_counter() - t0)

    cold, warm = times
    record = {
        "questions": a.questions, "choices": 4, "num_fewshot": a.num_fewshot, "size": a.size,
        "scoring": "row per choice" if a.rows_per_choice else "one pass per question",
        "params_m": round(n_params / 1e6, 2), "batch_size": a.batch_size,
        "prompt_tokens_mean": round(float(lengths.mean()), 1), "prompt_tokens_max": int(lengths.max()),
        "length_buckets": buckets, "cold_s": round(cold, 2), "warm_s": round(warm, 2),
        "cold_questions_per_s": round(a.questions / cold, 1), "warm_questions_per_s": round(a.questions / warm, 1),
        "accuracy": result.accuracy, "devices": str(jax.devices()[0].platform),
        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "jax": jax.__version__, "dtype": str(jnp.float32.dtype),
    }
    print(f"{a.questions} four-choice questions, {a.num_fewshot}-shot, {record['scoring']}, {a.size} model "
          f"({record['params_m']}M parameters), batch {a.batch_size}, prompts {record['prompt_tokens_mean']} tokens "
          f"on average (max {record['prompt_tokens_max']}), padded length buckets {buckets}")
    print("measured: wall time of evaluate_multiple_choice (prompts + tokenisation + jitted scoring), "
          "time.perf_counter, first call (with JIT compilation) and second call")
    print(f"cold: {cold:.2f} s = {a.questions / cold:.1f} questions/s;  "
          f"warm: {warm:.2f} s = {a.questions / warm:.1f} questions/s;  accuracy {result.accuracy:.3f} (random model)")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
