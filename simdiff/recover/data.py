"""Training text for recovery: packed windows, a held-out tail, and a resumable seeded order."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from simdiff.core.errors import SimdiffError
from simdiff.data import bos_token_id, contiguous_windows, load_text, tokenize_text

log = logging.getLogger(__name__)

# WikiText-2 has no train split here: recovery trains on the validation split and is evaluated on test.
TRAIN_SPLIT = "valid"


@dataclass
class TrainingText:
    """Packed ``[n, seq_len]`` windows: ``train`` for optimisation, ``heldout`` (the text's tail) for loss."""

    train: torch.Tensor
    heldout: torch.Tensor

    def step_indices(self, step: int, per_step: int, seed: int) -> torch.Tensor:
        """The training-window indices of optimiser step ``step`` (0-based): epochs of seeded permutations.

        A pure function of ``(step, seed)``, so a resumed run sees exactly the windows it would have seen.
        """
        n = len(self.train)
        start = step * per_step
        out = []
        while len(out) < per_step:
            epoch, offset = divmod(start + len(out), n)
            order = np.random.default_rng([seed, epoch]).permutation(n)
            out.extend(order[offset : offset + per_step - len(out)].tolist())
        return torch.tensor(out, dtype=torch.long)


def training_text(tokenizer, source: str, seq_len: int, heldout_windows: int,
                  data_root: str | None = None) -> TrainingText:
    """Tokenise ``source`` (``wikitext2`` = its validation split), pack it, and hold out the last windows."""
    text = load_text(source, split=TRAIN_SPLIT, root=data_root)
    windows = contiguous_windows(tokenize_text(tokenizer, text), seq_len, bos_token_id(tokenizer))
    if len(windows) <= heldout_windows:
        raise SimdiffError(
            f"training text {source!r} gives only {len(windows)} windows of {seq_len} tokens, but "
            f"{heldout_windows} are held out; use a longer text, a smaller --train-seq-len or fewer --heldout-windows"
        )
    split = len(windows) - heldout_windows
    log.info("training text %s: %d training + %d held-out windows of %d tokens", source, split,
             heldout_windows, seq_len)
    return TrainingText(windows[:split], windows[split:])
