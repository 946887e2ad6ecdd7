"""Seeds of a run: every random draw is re-derived from (run seed, purpose, rank/step/epoch), so a resumed run
continues exactly as the uninterrupted one would have (bitwise on CPU with ``data.num_workers=0``)."""

from __future__ import annotations

import random

import numpy as np
import torch

STEP, DATA_ORDER, LOADER = 0, 1, 2  # what a derived seed is for


def derive_seed(seed: int, purpose: int, *keys: int) -> int:
    """A well-mixed 63-bit seed for (run seed, purpose, rank/step/epoch ...), all non-negative integers."""
    entropy = [seed % 2**63, purpose, *keys]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
