"""Data for unlearning: token arrays and forget/retain pairing.

A tokenised set is a ``Dataset``: a mapping of ``input_ids``, ``attention_mask`` and
``labels`` (``-100`` = no loss), each a NumPy array ``[N, seq]`` with one fixed ``seq`` so
every batch has the same shape under jit.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

Dataset = Mapping[str, np.ndarray]  # input_ids / attention_mask / labels, each [N, seq]


class PairedBatches:
    """Forget-anchored batches: step ``t`` -> (forget rows, retain rows), a function of ``t``."""

    def __init__(self, forget: Dataset, retain: Dataset, batch_size: int, seed: int):
        for name, data in (("forget", forget), ("retain", retain)):
            if "input_ids" not in data:
                raise ValueError(f"the {name} set has no 'input_ids'")
            n = len(data["input_ids"])
            if n == 0:
                raise ValueError(f"the {name} set is empty")
            for key, arr in data.items():
                if len(arr) != n:
                    raise ValueError(f"{name} set: {key!r} has {len(arr)} rows but input_ids has {n}")
        n_f = len(forget["input_ids"])
        if n_f < batch_size:
            raise ValueError(f"the forget set has {n_f} rows, fewer than batch_size={batch_size}")
        self.forget, self.retain, self.batch_size, self.seed = forget, retain, batch_size, seed
        self.steps_per_epoch = n_f // batch_size  # the last incomplete batch is dropped (fixed shapes)

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, batch index within the epoch)`` of global step ``step``."""
        return divmod(step, self.steps_per_epoch)

    def __call__(self, step: int) -> tuple[dict, dict]:
        epoch, i = self.position(step)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.forget["input_ids"]))
        f_idx = np.sort(order[i * self.batch_size:(i + 1) * self.batch_size])
        r_idx = np.random.default_rng([self.seed, 1_000_003, step]).integers(0, len(self.retain["input_ids"]), self.batch_size)
        take = lambda data, idx: {k: np.asarray(v)[idx] for k, v in data.items()}
        return take(self.forget, f_idx), take(self.retain, r_idx)
