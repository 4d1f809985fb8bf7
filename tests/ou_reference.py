"""Restatements of locuslab/open-unlearning's code (``d3d7cf9``) for the TOFU/MUSE tests.

Each ``ou_*`` function restates, in torch/NumPy, the lines its docstring cites
(``src/evals/metrics/...``, ``src/data/utils.py``), with the model call replaced by given
logits where it says so. They are written from that code, not from jax_unlearn's.
"""

from __future__ import annotations

import numpy as np
import torch

IGNORE = -100


def ou_evaluate_probability(logits: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    """src/evals/metrics/utils.py:82-103 (``evaluate_probability``), model output = ``logits``."""
    shifted_labels = labels[..., 1:].contiguous()
    logits = logits[..., :-1, :].contiguous()
    loss_function = torch.nn.CrossEntropyLoss(ignore_index=IGNORE, reduction="none")
    losses = loss_function(logits.transpose(-1, -2), shifted_labels).sum(dim=-1)
    num_token_gt = (labels != IGNORE).sum(-1)
    avg_losses = losses / num_token_gt
    normalized_probs = torch.exp(-avg_losses)
    return [{"prob": p, "avg_loss": a} for p, a in zip(normalized_probs.tolist(), avg_losses.tolist())]


def ou_tokenwise_logprobs(logits, input_ids, labels):
    """src/evals/metrics/utils.py:106-146 (``tokenwise_logprobs``)."""
    bsz = logits.shape[0]
    log_probs = torch.nn.functional.log_softmax(logits, dim=-1)[:, :-1, :]
    next_tokens = input_ids[:, 1:].unsqueeze(-1)
    target_log_probs = torch.gather(log_probs, dim=2, index=next_tokens).squeeze(-1)
    out = []
    for i in range(bsz):
        actual_indices = (labels[i] != IGNORE).nonzero(as_tuple=True)[0][:-1]
        if actual_indices.numel() == 0:
            out.append(torch.tensor([], dtype=logits.dtype))
            continue
        start_idx, end_idx = actual_indices[0].item(), actual_indices[-1].item()
        out.append(target_log_probs[i, start_idx - 1:end_idx])
    return out


def ou_tokenwise_vocab_logprobs(logits, labels):
    """src/evals/metrics/utils.py:149-190 (``tokenwise_vocab_logprobs``, ``return_labels=True``)."""
    V = logits.shape[-1]
    log_probs = torch.nn.functional.log_softmax(logits, dim=-1)[:, :-1, :]
    lps, labs = [], []
    for i in range(logits.shape[0]):
        actual_indices = (labels[i] != IGNORE).nonzero(as_tuple=True)[0][:-1]
        if len(actual_indices) == 0:
            labs.append(torch.tensor([], dtype=torch.long))
            lps.append(torch.zeros(0, V, dtype=logits.dtype))
            continue
        start_idx, end_idx = actual_indices[0].item(), actual_indices[-1].item()
        lps.append(log_probs[i, start_idx - 1:end_idx])
        labs.append(labels[i][actual_indices])
    return lps, labs


def ou_exact_memorization(log_probs, labels):
    """src/evals/metrics/memorization.py:189-204 (the division in float64; torch's int/int is float32)."""
    valid_len = len(labels)
    if valid_len == 0:
        return None
    preds = torch.argmax(log_probs, dim=-1)
    return ((preds == labels).sum().double() / valid_len).item()


def ou_extraction_strength(log_probs, labels):
    """src/evals/metrics/memorization.py:234-254."""
    valid_len = len(labels)
    preds = torch.argmax(log_probs, dim=-1)
    for k in range(valid_len):
        suff_preds = preds[k:]
        suff_labels = labels[k:]
        if torch.equal(suff_preds, suff_labels):
            break
    if valid_len == 0:
        return 0
    return 1 - (k / valid_len)


def ou_min_k(lp: torch.Tensor, k: float):
    """src/evals/metrics/mia/min_k.py:18-26 (``compute_score``; float64 kept, their ``.float()`` would round)."""
    lp = lp.float().cpu().numpy() if lp.dtype != torch.float64 else lp.numpy()
    if lp.size == 0:
        return 0
    num_k = max(1, int(len(lp) * k))
    return -np.mean(np.sort(lp)[:num_k])


def ou_min_k_plus_plus(all_probs, target_prob, k: float):
    """src/evals/metrics/mia/min_k_plus_plus.py:17-39 (``compute_score``), in float64."""
    if len(target_prob) == 0:
        return 0
    mu = (torch.exp(all_probs) * all_probs).sum(-1)
    sigma = (torch.exp(all_probs) * torch.square(all_probs)).sum(-1) - torch.square(mu)
    sigma = torch.clamp(sigma, min=1e-6)
    scores = (target_prob.numpy() - mu.numpy()) / torch.sqrt(sigma).numpy()
    num_k = max(1, int(len(scores) * k))
    return -np.mean(sorted(scores)[:num_k])


def ou_tr_aggregate(arr, aggregator):
    """src/evals/metrics/memorization.py:114-133 (the truth ratio's aggregators)."""
    def closer_to_1_better(arr):
        return np.mean(np.minimum(arr, 1 / (arr + 1e-10)))

    def true_better(arr):
        return np.mean(np.maximum(0, 1 - arr))

    def prob_mean(arr):
        return np.mean(arr)

    return {"closer_to_1_better": closer_to_1_better, "true_better": true_better, "prob_mean": prob_mean}[aggregator](arr)


def ou_truth_ratio(correct_avg_losses, wrong_avg_losses, aggregator):
    """src/evals/metrics/memorization.py:149-173 (``truth_ratio``): ``(per item, aggregated)``."""
    correct = np.mean(np.array(correct_avg_losses), axis=tuple(range(1, np.array(correct_avg_losses).ndim)))
    wrong = np.mean(np.array(wrong_avg_losses), axis=tuple(range(1, np.array(wrong_avg_losses).ndim)))
    correct_prob, wrong_prob = np.exp(-correct), np.exp(-wrong)
    if aggregator != "prob_mean":
        tr = wrong_prob / (correct_prob + 1e-10)
    else:
        tr = correct_prob / (correct_prob + wrong_prob + 1e-10)
    return tr, ou_tr_aggregate(tr, aggregator)


def ou_probability_w_options(correct_prob, all_wrong):
    """src/evals/metrics/memorization.py:62-72."""
    correct, all_wrong = np.array(correct_prob), np.array(all_wrong)
    wrong = np.sum(all_wrong, axis=tuple(range(1, all_wrong.ndim)))
    probs = correct / (correct + wrong + 1e-10)
    return probs, np.mean(probs)


def ou_privleak(score, ref):
    """src/evals/metrics/privacy.py:50-52."""
    score, ref = 1 - score, 1 - ref
    return (score - ref) / (ref + 1e-10) * 100


def ou_gradnorm(model, input_ids, attention_mask, labels, ps):
    """src/evals/metrics/mia/gradnorm.py:19-34 on a batch of one row, with ``tokenwise_logprobs``
    (utils.py:106-146, ``grad=True``); the norms of one backward pass for each ``p`` in ``ps``."""
    model.train()
    model.zero_grad()
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    lps = ou_tokenwise_logprobs(out.logits, input_ids, labels)[0]
    (-torch.mean(lps)).backward()
    result = {}
    for p in ps:
        norms = [param.grad.detach().norm(p=p) for param in model.parameters() if param.grad is not None]
        result[p] = torch.stack(norms).mean().item()
    model.eval()
    model.zero_grad(set_to_none=True)  # the checkpoint's model is shared by other tests
    return result


def ou_mia_auc(forget_scores, holdout_scores) -> float:
    """src/evals/metrics/mia/utils.py:58-68: ``roc_auc_score`` with forget labelled 0, holdout 1."""
    from sklearn.metrics import roc_auc_score

    scores = np.array(list(forget_scores) + list(holdout_scores))
    labels = np.array([0] * len(forget_scores) + [1] * len(holdout_scores))
    return float(roc_auc_score(labels, scores))


# ----------------------------------------------------------------------------- data: src/data/utils.py
def ou_preprocess_chat_instance(tokenizer, template_config: dict, prompt_msgs, response_msgs, max_length: int,
                                predict_with_generate: bool = False) -> dict:
    """src/data/utils.py:46-140 (``preprocess_chat_instance``), as lists instead of tensors."""
    IGNORE_INDEX = IGNORE
    if template_config["apply_chat_template"]:
        chat = []
        system_prompt = template_config.get("system_prompt", None)
        if system_prompt:
            chat += [{"role": "system", "content": system_prompt}]
        for prompt, response in zip(prompt_msgs, response_msgs):
            chat += [{"role": "user", "content": prompt}]
            chat += [{"role": "assistant", "content": response}]
        date_str = template_config.get("date_string", None)
        date_info = {"date_string": date_str} if date_str is not None else {}
        chat_ids = tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=False,
                                                 return_dict=False, **date_info)
        prompt_ids = tokenizer.apply_chat_template(chat[:-1], tokenize=True, add_generation_prompt=True,
                                                   return_dict=False, **date_info)
    else:
        wrapped_prompt = ""
        system_prompt_with_special_tokens = template_config.get("system_prompt_with_special_tokens", None)
        if system_prompt_with_special_tokens:
            wrapped_prompt += system_prompt_with_special_tokens
        n_few_shot = len(prompt_msgs) - 1
        for i in range(n_few_shot):
            fs_prompt, fs_response = prompt_msgs[i], response_msgs[i]
            wrapped_prompt += (template_config["user_start_tag"] + fs_prompt + template_config["user_end_tag"]
                               + template_config["asst_start_tag"] + fs_response + template_config["asst_end_tag"])
        final_prompt, final_response = prompt_msgs[-1], response_msgs[-1]
        wrapped_prompt += (template_config["user_start_tag"] + final_prompt + template_config["user_end_tag"]
                           + template_config["asst_start_tag"])
        chat_ids = tokenizer(wrapped_prompt + final_response, add_special_tokens=True, max_length=max_length,
                             truncation=True)["input_ids"]
        prompt_ids = tokenizer(wrapped_prompt, add_special_tokens=True, max_length=max_length,
                               truncation=True)["input_ids"]
    chat_ids = list(chat_ids)
    if chat_ids[-1] != tokenizer.eos_token_id:
        chat_ids += [tokenizer.eos_token_id]
    len_matched = len(prompt_ids)
    item = {}
    if predict_with_generate:
        item["input_ids"] = list(prompt_ids)
        labels = chat_ids
    else:
        item["input_ids"] = chat_ids
        labels = [IGNORE_INDEX] * len_matched + chat_ids[len_matched:]
    item["labels"] = labels
    return item


def ou_preprocess_pretraining_instance(tokenizer, prefix: str, text_content: str, max_length: int,
                                       predict_with_generate: bool = False, insert_space: bool = False) -> dict:
    """src/data/utils.py:166-186 (``preprocess_pretraining_instance``), as lists."""
    full_seq_ids = tokenizer(prefix + (" " if insert_space else "") + text_content, add_special_tokens=True)["input_ids"]
    prefix_ids = tokenizer(prefix, add_special_tokens=True)["input_ids"]
    prefix_len = len(prefix_ids)
    full_seq_ids = full_seq_ids[: prefix_len + max_length]
    len_matched = prefix_len
    if len_matched == 0:
        len_matched = 1
    labels = [IGNORE] * len_matched + full_seq_ids[len_matched:]
    return {"input_ids": prefix_ids if predict_with_generate else full_seq_ids, "labels": labels}


def ou_ground_truth(tokenizer, generate_item: dict) -> str:
    """src/evals/metrics/utils.py:271-281: the decoded labels with the decoded input removed."""
    input_text = tokenizer.decode(generate_item["input_ids"], skip_special_tokens=True,
                                  clean_up_tokenization_spaces=True)
    tokens = [t for t in generate_item["labels"] if t != IGNORE]
    full_text = tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=True)
    return full_text.replace(input_text, "").strip()


def ou_cut_generation(tokenizer, raw_text: str, stopwords=None) -> str:
    """src/evals/metrics/utils.py:306-316: cut at the EOS text and the stop words, strip."""
    stopwords = [tokenizer.decode([tokenizer.eos_token_id])] + list(stopwords or [])
    for word in stopwords:
        if word and word in raw_text:
            raw_text = raw_text.split(word)[0]
    return raw_text.strip()


def ou_rouge(gen: str, gt: str) -> dict:
    """src/evals/metrics/utils.py:254-266 (``eval_rouge_recall_batch``, one pair)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    rouge_scores = scorer.score(gt, gen)
    return {"rouge1_recall": rouge_scores["rouge1"].recall, "rougeL_f1": rouge_scores["rougeL"].fmeasure,
            "rougeL_recall": rouge_scores["rougeL"].recall}


def hf_item_stats(hf, item: dict, k: float = 0.4) -> dict:
    """An item's open-unlearning statistics from a transformers forward pass of the unpadded row
    (float64 after the logits): avg_loss/prob (evaluate_probability), EM, ES, Min-K, Min-K++."""
    ids = torch.tensor([item["input_ids"]])
    labels = torch.tensor([item["labels"]])
    with torch.no_grad():
        logits = hf(ids).logits.double()
    ev = ou_evaluate_probability(logits, labels)[0]
    token_lp = ou_tokenwise_logprobs(logits, ids, labels)[0]
    vlp, vlab = ou_tokenwise_vocab_logprobs(logits, labels)
    return {**ev, "em": ou_exact_memorization(vlp[0], vlab[0]), "es": ou_extraction_strength(vlp[0], vlab[0]),
            "min_k": ou_min_k(token_lp, k), "min_k_plus_plus": ou_min_k_plus_plus(vlp[0], token_lp, k)}
