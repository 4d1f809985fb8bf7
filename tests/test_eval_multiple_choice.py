"""Multiple-choice accuracy: prompt format, and equality with transformers/PyTorch on an exported model."""

import numpy as np
import pytest
from test_eval_fixtures import (
    CHAR_SPLIT,
    MC_DEV,
    MC_TEST,
    SUBJECT,
    exported,
    make_tokenizer,
    mc_records,
    read_jsonl,
    torch_continuation_logprob,
    write_jsonl,
)
from ties import assert_choices_agree, tied

from jax_unlearn.eval import build_prompts, continuation_logprobs, evaluate_multiple_choice, format_prompt


def torch_reference(hf, tok, prompts, n_choices=4):
    ll = np.array([[torch_continuation_logprob(hf, tok, p, " " + "ABCD"[c]) for c in range(n_choices)]
                   for p in prompts])
    return ll, ll.argmax(1)


def test_prompt_format_is_the_harness_mmlu_layout():
    q = {"question": "  Which organ pumps blood? ", "choices": ["heart", "lung", "skin", "bone"], "answer": 0}
    assert format_prompt(q) == "Which organ pumps blood?\nA. heart\nB. lung\nC. skin\nD. bone\nAnswer:"
    shot = {"question": "What covers the body?", "choices": ["lung", "eye", "skin", "heart"], "answer": 2}
    assert format_prompt(q, [shot], subject="high_school_biology") == (
        "The following are multiple choice questions (with answers) about high school biology.\n\n"
        "What covers the body?\nA. lung\nB. eye\nC. skin\nD. heart\nAnswer: C\n\n"
        "Which organ pumps blood?\nA. heart\nB. lung\nC. skin\nD. bone\nAnswer:")


def test_fewshot_takes_first_examples_of_the_same_subject_and_skips_the_question():
    a1, a2 = ({"question": f"a{i}?", "choices": ["x", "y"], "answer": 0, "subject": "a"} for i in (1, 2))
    b1, b2 = ({"question": f"b{i}?", "choices": ["x", "y"], "answer": 1, "subject": "b"} for i in (1, 2))
    _, prompts = build_prompts([a1, b1], num_fewshot=1, fewshot=[b1, a1, a2, b2])
    assert prompts[0] == ("The following are multiple choice questions (with answers) about a.\n\n"
                          "a2?\nA. x\nB. y\nAnswer: A\n\na1?\nA. x\nB. y\nAnswer:")  # a1 itself skipped
    assert prompts[1].split("\n\n")[1] == "b2?\nA. x\nB. y\nAnswer: B"  # b1 itself is skipped
    with pytest.raises(ValueError, match="only 0 usable examples of subject 'b'"):
        build_prompts([b1], num_fewshot=1, fewshot=[b1, a1])


@pytest.mark.parametrize("num_fewshot", [0, 2])
def test_accuracy_and_choices_equal_transformers(tmp_path, num_fewshot):
    _, model, tok, hf = exported()
    items = read_jsonl(write_jsonl(tmp_path / "test.jsonl", mc_records(MC_TEST)))
    dev = mc_records(MC_DEV)
    ours = evaluate_multiple_choice(model, tok, items, num_fewshot=num_fewshot, fewshot=dev, batch_size=8)
    ll, choices = torch_reference(hf, tok, ours.prompts)
    np.testing.assert_allclose(ours.loglikelihoods, ll, atol=2e-4)
    assert_choices_agree(ours.predictions, ll)  # transformers' choice, up to near-ties (tests/ties.py)
    np.testing.assert_array_equal(ours.predictions, ours.loglikelihoods.argmax(1))
    answers = np.array([a for *_, a in MC_TEST])
    assert ours.accuracy == pytest.approx(float(np.mean(ours.predictions == answers)))
    assert ours.by_subject == {SUBJECT: ours.accuracy}
    assert len(set(ours.predictions.tolist())) > 1  # the random model does not answer one letter throughout
    if num_fewshot:
        assert ours.prompts[0].count("\nAnswer: ") == 2 and ours.prompts[0].startswith("The following")
        # one row per choice (the general path) gives the same answers as one pass per question
        rows = evaluate_multiple_choice(model, tok, items, num_fewshot=num_fewshot, fewshot=dev, batch_size=8,
                                        single_pass=False)
        np.testing.assert_allclose(rows.loglikelihoods, ours.loglikelihoods, atol=2e-5)
        assert_choices_agree(rows.predictions, ours.loglikelihoods)


def test_multi_token_continuations_equal_transformers():
    """A tokenizer that splits " A" into " " + "A": every choice is a two-token continuation."""
    _, model, _, hf = exported()
    tok = make_tokenizer(CHAR_SPLIT)
    items = mc_records(MC_TEST[:6])
    ours = evaluate_multiple_choice(model, tok, items, batch_size=8)
    ll, choices = torch_reference(hf, tok, ours.prompts)
    np.testing.assert_allclose(ours.loglikelihoods, ll, atol=2e-4)
    assert_choices_agree(ours.predictions, ll)
    with pytest.raises(ValueError, match="single_pass=True but some choice continuation is not exactly one token"):
        evaluate_multiple_choice(model, tok, items, single_pass=True)


def test_continuation_logprobs_truncate_left_and_flag_greedy():
    _, model, tok, hf = exported()
    ctx = tok("The heart pumps blood through the body. The brain is inside the")["input_ids"]
    cont = tok(" head.", add_special_tokens=False)["input_ids"]
    full, greedy = continuation_logprobs(model, [(ctx, cont), (ctx[:3], cont)], batch_size=4)
    short, _ = continuation_logprobs(model, [(ctx, cont)], max_length=6)
    import torch

    def ref(ids, n_cont):
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
        return float(sum(lp[t - 1, ids[t]] for t in range(len(ids) - n_cont, len(ids)))), lp
    expect, lp = ref(ctx + cont, len(cont))
    assert full[0] == pytest.approx(expect, abs=2e-4)
    assert full[1] == pytest.approx(ref(ctx[:3] + cont, len(cont))[0], abs=2e-4)
    assert short[0] == pytest.approx(ref((ctx + cont)[-7:], len(cont))[0], abs=2e-4)  # 6 inputs + the last label
    steps = [lp[t - 1].numpy() for t in range(len(ctx), len(ctx + cont))]
    if not any(tied(s).sum() > 1 for s in steps):  # (at a near-tie either answer is right)
        assert bool(greedy[0]) == all(int(s.argmax()) == tok for s, tok in zip(steps, cont))
    first = lp[len(ctx) - 1].numpy()
    _, g = continuation_logprobs(model, [(ctx, [int(first.argmax())])])
    assert bool(g[0]) or tied(first).sum() > 1


def test_one_compilation_per_padded_length_bucket():
    from jax_unlearn.eval import scoring

    _, model, tok, _ = exported()
    items = mc_records(MC_TEST) + mc_records(MC_DEV)  # 15 questions in batches of 7 (a size no other test uses)
    _, prompts = build_prompts(items)
    lengths = sorted((len(tok(p)["input_ids"]) for p in prompts), reverse=True)
    buckets = {scoring.bucket_length(max(lengths[i:i + 7])) for i in range(0, len(lengths), 7)}
    kernel = scoring._next_token_kernel
    before = kernel._cache_size()
    first = evaluate_multiple_choice(model, tok, items, batch_size=7)
    grown = kernel._cache_size() - before
    assert grown == len(buckets)  # the last batch (1 question + 6 fillers) reuses a compiled shape
    again = evaluate_multiple_choice(model, tok, items[::-1], batch_size=7)
    assert kernel._cache_size() - before == grown  # same shapes: nothing recompiles
    assert_choices_agree(again.predictions[::-1], first.loglikelihoods)  # other batches: rounding may differ
