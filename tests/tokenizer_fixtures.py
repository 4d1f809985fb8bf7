"""A tiny byte-level BPE tokenizer built locally (no download), saved as a Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = [
    "The capital of France is Paris.",
    "Anthrax spores survive for decades in soil.",
    "Question: What is the capital of France?\nAnswer: Paris",
    "Harry Potter is a wizard who attends Hogwarts.",
    "hello world\n\nsecond document\n\nthird one",
]

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def make_tokenizer(folder: Path) -> Path:
    """Byte-level BPE (every string is encodable, newlines included) that prepends ``<s>``
    like a LLaMA tokenizer; ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2. Returns ``folder``."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[PAD, BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(CORPUS * 4, trainer)
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 1)])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS)
    tok.save_pretrained(folder)
    return folder
