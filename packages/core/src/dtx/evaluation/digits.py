"""A small CNN that classifies scikit-learn digits, the judge of the digits demo: it scores whether samples show the
requested class, and its penultimate features give a Fréchet distance to the real digits.

The weights ship in ``weights/digits_classifier.safetensors``; ``train_digits_classifier(seed)`` regenerates them
(``python -m dtx.evaluation.digits``) from the ``train`` split of ``dtx.data.digits``. Any input size that is a
multiple of 8 is area-downsampled to 8x8 first, which exactly undoes the dataset's nearest upsampling.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ShapeError

WEIGHTS = Path(__file__).parent / "weights" / "digits_classifier.safetensors"
FEATURE_DIM = 64
NUM_CLASSES = 10


class DigitsClassifier(nn.Module):
    """conv3x3(16) -> conv3x3(32) -> 2x2 max-pool -> Linear(512, 64) features -> ReLU -> Linear(64, 10) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, FEATURE_DIM)
        self.fc2 = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.dropout = nn.Dropout(0.2)

    @staticmethod
    def to_8x8(images: torch.Tensor) -> torch.Tensor:
        """``[N, 1|3, S, S]`` (or ``[N, S, S]``) in [-1, 1] with S a multiple of 8 -> ``[N, 1, 8, 8]`` by area."""
        x = images.unsqueeze(1) if images.dim() == 3 else images
        if x.dim() != 4 or x.shape[1] not in (1, 3) or x.shape[-1] != x.shape[-2] or x.shape[-1] % 8:
            raise ShapeError(f"digits images must be [N, 1 or 3, S, S] with S a multiple of 8, got "
                             f"{tuple(images.shape)}")
        x = x.float().mean(dim=1, keepdim=True)
        return F.avg_pool2d(x, x.shape[-1] // 8) if x.shape[-1] != 8 else x

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate layer ``[N, 64]`` before its ReLU: full rank, where the ReLU leaves some units always off."""
        x = self.to_8x8(images)
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc1(x.flatten(1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.relu(self.features(images))))

    @classmethod
    def load(cls, path: str | Path | None = None) -> "DigitsClassifier":
        """The classifier with the shipped weights (or those at ``path``), in eval mode."""
        from safetensors.torch import load_file

        path = Path(path) if path is not None else WEIGHTS
        if not path.is_file():
            raise CheckpointError(f"digits classifier weights not found: {path}")
        model = cls()
        model.load_state_dict(load_file(str(path)))
        return model.eval().requires_grad_(False)


def train_digits_classifier(seed: int = 0, epochs: int = 60, batch_size: int = 64, lr: float = 3e-3,
                            noise: float = 0.1) -> DigitsClassifier:
    """Train the classifier deterministically on the digits ``train`` split (AdamW, one-cycle lr, light input noise).

    Runs on one CPU thread, so the result does not depend on the machine's thread count (and is fast when busy).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(seed, epochs, batch_size, lr, noise)
    finally:
        torch.set_num_threads(threads)


def _train(seed: int, epochs: int, batch_size: int, lr: float, noise: float) -> DigitsClassifier:
    from ..data.digits import digits_arrays

    x, y = digits_arrays("train", 8)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * -(-len(y) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch_size):
            xb = x[idx] + noise * torch.randn(x[idx].shape, generator=gen)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval().requires_grad_(False)


@lru_cache(maxsize=1)
def _shipped() -> DigitsClassifier:
    return DigitsClassifier.load()


@torch.no_grad()
def digits_logits(images: torch.Tensor, model: DigitsClassifier | None = None, batch_size: int = 2048) -> torch.Tensor:
    model = model or _shipped()
    return torch.cat([model(chunk) for chunk in images.cpu().split(batch_size)])


def digits_accuracy(images: torch.Tensor, labels: torch.Tensor, model: DigitsClassifier | None = None) -> float:
    """Fraction of ``images`` ([N, 1, S, S] in [-1, 1]) that the classifier labels as ``labels``."""
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    if len(labels) != len(images):
        raise ShapeError(f"{len(images)} images but {len(labels)} labels")
    return (digits_logits(images, model).argmax(1) == labels).float().mean().item()


@torch.no_grad()
def digits_features(images: torch.Tensor, model: DigitsClassifier | None = None,
                    batch_size: int = 2048) -> torch.Tensor:
    """Penultimate features ``[N, 64]`` for a Fréchet distance in the classifier's feature space."""
    model = model or _shipped()
    return torch.cat([model.features(chunk) for chunk in images.cpu().split(batch_size)])


if __name__ == "__main__":
    from safetensors.torch import save_file

    from ..data.digits import digits_arrays

    trained = train_digits_classifier(0)
    WEIGHTS.parent.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(WEIGHTS))
    x_test, y_test = digits_arrays("test", 8)
    print(f"wrote {WEIGHTS}; test accuracy {digits_accuracy(x_test, y_test, trained):.4f}")
