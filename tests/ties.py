"""Comparisons of discrete choices (argmax answers, greedy tokens) that tolerate near-ties.

Two float32 computations of the same scores — ours and transformers', padded and unpadded,
scanned and unrolled, or the same program on another CPU (Xeon vs EPYC round differently) —
agree to about 1e-6 relative (the parity tests bound logits at 1e-4 relative). A choice
between two candidates whose reference scores differ by less than that may go either way, so
these helpers demand equality wherever the reference's margin is larger than ``tol`` and accept
either side of a near-tie; after a greedy tie the two sequences may legitimately diverge, so
a row is compared up to its first tie only.

``tol`` is relative to the score scale: a candidate counts as tied when its score is within
``tol * max(1, |best|)`` of the best one. ``TIE_TOL = 1e-4`` is about 1000 float32 ulps and the
parity tolerance of the model tests, far below any margin a wrong model would produce.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

TIE_TOL = 1e-4


def tied(scores: np.ndarray, tol: float = TIE_TOL) -> np.ndarray:
    """``[..., C]`` scores -> bool ``[..., C]``: candidates within ``tol`` (relative) of the best."""
    scores = np.asarray(scores, np.float64)
    best = scores.max(axis=-1, keepdims=True)
    return scores >= best - tol * np.maximum(1.0, np.abs(best))


def assert_choices_agree(predictions, ref_scores, tol: float = TIE_TOL) -> int:
    """Each ``predictions[i]`` is the argmax of ``ref_scores[i]`` (``[n, C]``) or tied with it.

    Returns the number of rows decided by a near-tie (0 in every run seen so far)."""
    predictions, ref_scores = np.asarray(predictions), np.asarray(ref_scores)
    ok = tied(ref_scores, tol)[np.arange(len(predictions)), predictions]
    bad = np.flatnonzero(~ok)
    assert not len(bad), (f"rows {bad.tolist()}: predicted {predictions[bad].tolist()}, reference argmax "
                          f"{ref_scores[bad].argmax(-1).tolist()} by a margin larger than {tol} (relative)")
    return int(np.sum(tied(ref_scores, tol).sum(-1) > 1))


def stable_prefix(ref_logits, tol: float = TIE_TOL) -> int:
    """Number of leading steps of a greedy path whose choice is not a near-tie (``[n, vocab]``)."""
    ties = tied(ref_logits, tol).sum(-1) > 1
    return int(np.argmax(ties)) if ties.any() else len(ties)


def assert_greedy_agree(tokens, ref_tokens, ref_logits, tol: float = TIE_TOL) -> int:
    """Greedy sequences ``tokens`` and ``ref_tokens`` (``[b, n]``) agree up to near-ties.

    ``ref_logits [b, n, vocab]``: the scores the reference chose each of its tokens from. Each
    row must equal the reference until the first position where they differ; there the
    reference must have been tied between the two tokens, and the rest of the row is not
    compared. Returns the number of rows that diverged at a tie."""
    tokens, ref_tokens, ref_logits = np.asarray(tokens), np.asarray(ref_tokens), np.asarray(ref_logits)
    assert tokens.shape == ref_tokens.shape, (tokens.shape, ref_tokens.shape)
    diverged = 0
    for i in range(len(tokens)):
        differ = np.flatnonzero(tokens[i] != ref_tokens[i])
        if not len(differ):
            continue
        t = int(differ[0])
        assert tied(ref_logits[i, t], tol)[tokens[i, t]], (
            f"row {i} step {t}: token {tokens[i, t]} vs reference {ref_tokens[i, t]}, which led by more than "
            f"{tol} (relative); rows {tokens[i].tolist()} vs {ref_tokens[i].tolist()}")
        diverged += 1
    return diverged


def assert_text_agrees(text: str, ref_ids: Sequence[int], ref_logits, render: Callable[[list[int]], str],
                       tol: float = TIE_TOL) -> None:
    """A generated ``text`` equals the reference's, up to its first near-tie.

    ``ref_ids`` are the reference's greedy tokens, ``ref_logits [n, vocab]`` what it chose them
    from, and ``render(ids)`` turns tokens into the final text (decode, cut at stop strings,
    strip). With no near-tie on the path the texts are equal; otherwise ``text`` must start
    with the rendering of the tokens before the tie followed by one of the tied candidates (so
    a tie at the first step still pins the first token to one of the tied ones)."""
    n = stable_prefix(ref_logits, tol)
    if n == len(ref_ids):
        assert text == render(list(ref_ids)), (text, render(list(ref_ids)))
        return
    prefix = list(ref_ids[:n])
    candidates = np.flatnonzero(tied(ref_logits[n], tol)).tolist()
    starts = [render(prefix + [c]) for c in candidates]
    assert any(text.startswith(s) for s in starts), (text, starts, n)
