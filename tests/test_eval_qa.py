"""RWKU-style QA: prompts, greedy answers equal to transformers' generate, ROUGE-L recall per level."""

import numpy as np
import pytest
from rouge_score import rouge_scorer
from test_eval_fixtures import QA, exported, qa_records, torch_greedy
from ties import assert_text_agrees

from jax_unlearn.eval import evaluate_qa, newline_token_ids, qa_prompt, rouge_l_recall
from jax_unlearn.eval.generation import cut_at, generate_text

PAIRS = [  # (prediction, reference, hand-computed recall = LCS / len(reference))
    ("the cat on mat", "the cat sat on the mat", 4 / 6),
    ("It is Paris, France.", "Paris", 1.0),
    ("", "two eyes", 0.0),
    ("eyes two", "two eyes", 1 / 2),
    ("Blood, the HEART pumps blood!", "the heart pumps blood", 1.0),
]


@pytest.mark.parametrize("prediction,reference,expected", PAIRS)
def test_rouge_l_recall_equals_rouge_score_and_hand_values(prediction, reference, expected):
    got = rouge_l_recall(prediction, reference)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    assert got == scorer.score(reference, prediction)["rougeL"].recall
    assert got == pytest.approx(expected)


def test_rouge_l_stemming_is_optional():
    assert rouge_l_recall("run dog", "running dogs") == 0.0
    assert rouge_l_recall("run dog", "running dogs", use_stemmer=True) == 1.0


def test_rwku_prompts_and_auto_style():
    assert qa_prompt("The heart pumps ___.", "fill_blank") == (
        "Please complete the blank in the following question.\nQuestion: The heart pumps ___.\nAnswer:")
    assert qa_prompt("Which organ pumps blood?", "question") == (
        "Please briefly answer the following question.\nQuestion: Which organ pumps blood?\nAnswer:")


def test_chat_template_wraps_the_instruction_then_answer():
    _, _, tok, _ = exported()
    chat = tok.__class__.from_pretrained(tok.name_or_path)
    chat.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
    got = qa_prompt("Where is the brain?", "question", tokenizer=chat, chat_template=True)
    assert got == ("<|user|>Please briefly answer the following question.\nQuestion: Where is the brain?\n"
                   "<|assistant|>Answer:")


def hf_answer(hf, tok, prompt: str, max_new_tokens: int = 32) -> tuple[list[int], np.ndarray]:
    """Greedy transformers generation from the unpadded prompt, stopped at EOS or a newline token:
    ``(tokens, the logits each was chosen from)``."""
    return torch_greedy(hf, tok, prompt, max_new_tokens, [tok.eos_token_id, *newline_token_ids(tok)])


def answer_text(tok, gen: list[int]) -> str:
    """`evaluate_qa`'s answer of generated tokens: decoded, cut at the first newline, stripped."""
    return tok.decode(gen, skip_special_tokens=True).split("\n", 1)[0].strip()


def test_answers_equal_transformers_generate_and_scores_are_per_level():
    _, model, tok, hf = exported()
    assert newline_token_ids(tok) == (tok.convert_tokens_to_ids("\n"),)
    result = evaluate_qa(model, tok, qa_records(), batch_size=4)
    styles = ["fill_blank" if lv == "1" else "question" for *_, lv in QA]
    assert list(result.prompts) == [qa_prompt(q, s) for (q, *_), s in zip(QA, styles)]
    raw, logits = zip(*(hf_answer(hf, tok, p) for p in result.prompts))
    for pred, gen, lg in zip(result.predictions, raw, logits):  # equal up to near-ties (tests/ties.py)
        assert_text_agrees(pred, gen, lg, lambda ids: answer_text(tok, ids))
    expected = list(result.predictions)  # (= transformers' wherever the greedy path had no near-tie)
    nl = tok.convert_tokens_to_ids("\n")
    assert any(nl in g for g in raw) and any(len(g) == 32 and nl not in g for g in raw)  # both stops happen
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [scorer.score(a, p)["rougeL"].recall for (_, a, _), p in zip(QA, expected)]
    np.testing.assert_allclose(result.scores, scores)
    assert set(result.by_level) == {"1", "2", "3"}
    for lv in "123":
        assert result.by_level[lv] == pytest.approx(np.mean([s for s, (*_, level) in zip(scores, QA) if level == lv]))
    assert result.rouge_l_recall == pytest.approx(np.mean(scores))

    # gold answers built from the model's own words: recall is known and non-zero
    words = [p.split() for p in expected]
    probes = [{"question": q, "answer": " ".join(w[:2] + ["zebra"]), "level": lv}
              for (q, _, lv), w in zip(QA, words) if len(w) >= 2]
    assert probes
    again = evaluate_qa(model, tok, probes, batch_size=4)
    for probe, pred, score in zip(probes, again.predictions, again.scores):
        assert score == pytest.approx(rouge_l_recall(pred, probe["answer"]))
    kept = [i for i, w in enumerate(words) if len(w) >= 2]
    for pred, i in zip(again.predictions, kept):  # other batches than above: equal up to near-ties
        assert_text_agrees(pred, raw[i], logits[i], lambda ids: answer_text(tok, ids))
    assert again.rouge_l_recall > 0.3 and min(again.scores) > 0  # the model's first words are recalled


def test_generate_text_cuts_at_the_earliest_stop_string():
    assert cut_at("a b\nc. d", ["\n", "."]) == "a b"
    assert cut_at("no stop", ["\n"]) == "no stop"
    _, model, tok, hf = exported()
    prompts = [qa_prompt(q, "question") for q, *_ in QA[:3]]
    free = generate_text(model, tok, prompts, max_new_tokens=6, batch_size=2)
    for p, text in zip(prompts, free):
        gen, lg = torch_greedy(hf, tok, p, 6, tok.eos_token_id)
        assert_text_agrees(text, gen, lg, lambda ids: tok.decode(ids, skip_special_tokens=True))
