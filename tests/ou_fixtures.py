"""Shared builders of the TOFU/MUSE tests: a word-level tokenizer over the test data and tiny models.

The tokenizer is GPT-2-like at the word level (a word keeps its leading space; ``"\\n"``, ``" "``
and punctuation are pieces), prepends ``<s>`` like a LLaMA tokenizer and fills its vocabulary up
to the model's 128 ids, so every id a random model generates decodes to a piece. The models are
`hf_fixtures` checkpoints (random LLaMA, GQA, biases, vocabulary 128), loaded with `load_hf`.
"""

from __future__ import annotations

import torch
import transformers
from hf_fixtures import checkpoint
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from jax_unlearn.models import load_hf

# The references run hundreds of tiny forward passes beside JAX's threads: one torch thread is
# ~40x faster here than two contending for the 2 cores of the test machines.
torch.set_num_threads(1)

VOCAB = 128
SPECIALS = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
SPLIT = r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]|\n| +"
TEMPLATE_TEXT = "Question: x\nAnswer: y\n\n"  # the default template's pieces


def word_tokenizer(corpus: list[str]) -> transformers.PreTrainedTokenizerFast:
    pre = pre_tokenizers.Split(Regex(SPLIT), behavior="isolated")
    vocab = dict(SPECIALS)
    for text in [TEMPLATE_TEXT, *corpus]:
        for piece, _ in pre.pre_tokenize_str(text):
            vocab.setdefault(piece, len(vocab))
    if len(vocab) > VOCAB:
        raise AssertionError(f"the test corpus has {len(vocab)} pieces, more than the model's {VOCAB} ids")
    i = 0
    while len(vocab) < VOCAB:
        vocab.setdefault(f" zz{i}", len(vocab))
        i += 1
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<pad>")


_MODELS: dict = {}


def model_pair(seed: int):
    """``(jax model, torch model)`` of the random ``llama_gqa`` checkpoint ``seed`` (built once)."""
    if seed not in _MODELS:
        folder, hf = checkpoint("llama_gqa", seed=seed)
        _MODELS[seed] = (load_hf(folder), hf)
    return _MODELS[seed]
