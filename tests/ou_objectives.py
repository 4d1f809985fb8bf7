"""Restatements of locuslab/open-unlearning's forget losses (``d3d7cf9``), in torch, for
tests/test_objectives_field.py.

Each ``ou_*`` function restates the lines its docstring cites with the model's output replaced
by given logits (``logits = model(**inputs).logits``). They are written from that code, not
from jax_unlearn's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def ou_batch_nll(logits, labels):
    """src/trainer/utils.py:34-44 (``compute_batch_nll``): summed NLL per row."""
    shifted_labels = labels[..., 1:].contiguous()
    logits = logits[..., :-1, :].contiguous()
    loss_function = nn.CrossEntropyLoss(ignore_index=-100, reduction="none")
    return loss_function(logits.transpose(-1, -2), shifted_labels).sum(dim=-1)


def ou_dpo(win_logits, win_ref_logits, win_labels, lose_logits, lose_ref_logits, lose_labels, beta):
    """src/trainer/utils.py:47-67 (``compute_dpo_loss``), as src/trainer/unlearn/dpo.py:16-22 calls
    it: ``win_inputs`` = the alternate (idk) answer, ``lose_inputs`` = the forget answer."""
    win_loss = ou_batch_nll(win_logits, win_labels)
    with torch.no_grad():
        win_ref_loss = ou_batch_nll(win_ref_logits, win_labels)
    win_log_ratio = -(win_loss - win_ref_loss)
    lose_loss = ou_batch_nll(lose_logits, lose_labels)
    with torch.no_grad():
        lose_ref_loss = ou_batch_nll(lose_ref_logits, lose_labels)
    lose_log_ratio = -(lose_loss - lose_ref_loss)
    return -2 / beta * F.logsigmoid(beta * (win_log_ratio - lose_log_ratio)).mean()


def ou_undial(logits, teacher_logits, labels, beta):
    """src/trainer/utils.py:70-99 (``compute_undial_loss``)."""
    shift_labels = labels[..., 1:].contiguous()
    shift_logits = logits[..., :-1, :].contiguous()
    shift_teacher_logits = teacher_logits.detach()[..., :-1, :].contiguous()
    mask = torch.zeros_like(shift_teacher_logits)
    batch_idx = torch.arange(mask.shape[0]).view(-1, 1, 1)
    seq_idx = torch.arange(mask.shape[1]).view(1, -1, 1)
    mask[batch_idx, seq_idx, shift_labels.unsqueeze(-1)] = 1.0
    pre_softmax = shift_teacher_logits - mask * beta
    soft_label = F.softmax(pre_softmax, dim=-1)
    loss_fct = nn.CrossEntropyLoss(reduction="none")
    loss = loss_fct(shift_logits.view(-1, shift_logits.size(-1)), soft_label.view(-1, soft_label.size(-1)))
    return loss.mean()


def ou_wga(logits, labels, beta):
    """src/trainer/utils.py:102-115 (``compute_wga_loss``)."""
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = labels[..., 1:].contiguous()
    lm_loss = nn.CrossEntropyLoss(ignore_index=-100, reduction="none")(
        shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
    weight_ce = ((-lm_loss).exp().detach()) ** beta
    return -(weight_ce * lm_loss)[shift_labels.view(-1) != -100].mean()


def ou_satimp(logits, labels, beta1, beta2):
    """src/trainer/utils.py:118-134 (``compute_satimp_loss``)."""
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = labels[..., 1:].contiguous()
    lm_loss = nn.CrossEntropyLoss(ignore_index=-100, reduction="none")(
        shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
    weight_sat = ((-lm_loss).exp().detach()) ** beta1
    weight_imp = (1 - (-lm_loss).exp().detach()) ** beta2
    return -((weight_sat * weight_imp) * lm_loss)[shift_labels.view(-1) != -100].mean()


def ou_cross_entropy_unlearning_loss(logits, labels, ignore_index=-100):
    """src/trainer/unlearn/ceu.py:7-61 (``cross_entropy_unlearning_loss``)."""
    valid_mask = labels != ignore_index
    valid_logits = logits[valid_mask]
    valid_labels = labels[valid_mask]
    valid_target_logits = valid_logits.detach().clone()
    valid_target_logits.scatter_(dim=-1, index=valid_labels.unsqueeze(-1), value=float("-inf"))
    valid_target_probabilities = F.softmax(valid_target_logits, dim=-1)
    return F.cross_entropy(input=valid_logits, target=valid_target_probabilities)


def ou_ceu(logits, labels, ignore_first_n_answer_tokens=1):
    """src/trainer/unlearn/ceu.py:64-81 (``compute_batch_ceu``)."""
    valid_mask = labels != -100
    update_mask = (valid_mask.cumsum(dim=-1) <= ignore_first_n_answer_tokens) & valid_mask
    labels_without_first_n_answer_tokens = labels.masked_fill(update_mask, -100)
    shifted_labels = labels_without_first_n_answer_tokens[..., 1:].contiguous()
    shifted_logits = logits[..., :-1, :].contiguous()
    return ou_cross_entropy_unlearning_loss(shifted_logits, shifted_labels, ignore_index=-100)


def ou_pdu_forget(logits, labels):
    """src/trainer/unlearn/pdu.py:113-122 (``PDU.compute_loss``, its forget loss)."""
    logits = logits.reshape(-1, logits.size(-1))
    max_logits = logits.max(dim=-1)[0]
    average_logits = logits.mean(dim=-1)
    forget_loss = (max_logits - average_logits) ** 2
    mask = (labels != -100).reshape(-1)
    return (forget_loss * mask).sum() / mask.sum()


def ou_hf_nll(logits, labels):
    """The retain loss ``model(**retain_inputs).loss`` (src/trainer/unlearn/grad_diff.py:26-29):
    transformers' causal-LM loss, the token mean of the shifted labels."""
    return nn.CrossEntropyLoss()(logits[..., :-1, :].reshape(-1, logits.shape[-1]), labels[..., 1:].reshape(-1))
