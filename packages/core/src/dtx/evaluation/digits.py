"""A small CNN that classifies scikit-learn digits, the judge of the digits demo: it scores whether samples show the
requested class, and its penultimate features give a Fréchet distance to the real digits.

The weights ship in ``weights/digits_classifier.safetensors``; ``train_digits_classifier(seed)`` regenerates them
(``python -m dtx.evaluation.digits``) from the ``train`` split of ``dtx.data.digits``. Any input size that is a
multiple of 8 is area-downsampled to 8x8 first, which exactly undoes the dataset's nearest upsampling.

Videos of one moving digit (Latte's ``moving-digits``: a 2x-upscaled 16x16 digit on a black 32x32 canvas) are scored
frame by frame with :func:`frame_consistency`: each frame's digit is located, cropped and classified.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ShapeError
from ..layers.linear import Linear

WEIGHTS = Path(__file__).parent / "weights" / "digits_classifier.safetensors"
FEATURE_DIM = 64
NUM_CLASSES = 10
CROP = 16  # side of the window cut around each video frame's digit (moving-digits' sprite)
BRIGHT = 0.0  # a pixel above mid grey is part of the digit: it finds the digit and its centroid
LIT = -0.8  # a pixel this bright (just above 1/16 of full ink) near the digit is part of its extent and mass
MARGIN = 4  # how far (px) around the first window lit pixels are taken into account
MOVING_PX = 1.0  # a clip "moves" when its digit's centroid gets this far from where it started
DIGIT_INK = 0.9  # a frame shows one digit when at least this fraction of its ink (above LIT) lies in the digit's window
CONFIDENT = 0.5  # a frame's class counts for label_agreement when the classifier gives it at least this probability


class DigitsClassifier(nn.Module):
    """conv3x3(16) -> conv3x3(32) -> 2x2 max-pool -> Linear(512, 64) features -> ReLU -> Linear(64, 10) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = Linear(32 * 4 * 4, FEATURE_DIM)
        self.fc2 = Linear(FEATURE_DIM, NUM_CLASSES)
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


# -- videos of one moving digit ----------------------------------------------------------------------------------

def _grey_frames(videos: torch.Tensor, crop: int) -> torch.Tensor:
    """``[N, F, 1|3, H, W]`` in [-1, 1] -> grey ``[N, F, H, W]`` (channel mean), checking the layout and sizes."""
    v = torch.as_tensor(videos)
    if v.dim() != 5 or v.shape[2] not in (1, 3) or 0 in v.shape:
        raise ShapeError(f"videos must be non-empty [N, F, 1 or 3, H, W] in [-1, 1], got {tuple(v.shape)}")
    if crop < 8 or crop % 8:
        raise ShapeError(f"the digit crop must be a multiple of 8, got {crop}")
    if v.shape[-2] < crop or v.shape[-1] < crop:
        raise ShapeError(f"video frames must be at least {crop}x{crop} to crop a digit, got "
                         f"{v.shape[-2]}x{v.shape[-1]}")
    return v.detach().cpu().float().mean(dim=2)


def _extent(mask: torch.Tensor, fallback: torch.Tensor, block: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left ``[M, 2]`` and bottom-right ``[M, 2]`` (inclusive) of the bounding box of each ``[M, H, W]`` mask,
    counting only pixels inside a ``block`` x ``block`` square of set pixels (2: isolated pixels do not count);
    ``fallback`` (both corners) where nothing counts."""
    m, h, w = mask.shape
    if block > 1:  # corners of all-set squares, then the squares' extent
        mask = -F.max_pool2d(-mask.float().unsqueeze(1), block, stride=1).squeeze(1) > 0
    rows, cols = mask.any(2), mask.any(1)
    ir, ic = torch.arange(rows.shape[1]), torch.arange(cols.shape[1])
    first = torch.stack([torch.where(rows, ir, h).min(1).values, torch.where(cols, ic, w).min(1).values], 1)
    last = torch.stack([torch.where(rows, ir, -1).max(1).values, torch.where(cols, ic, -1).max(1).values], 1)
    last = last + (block - 1)
    found = mask.flatten(1).any(1)[:, None]
    return (torch.where(found, first.to(fallback.dtype), fallback),
            torch.where(found, last.to(fallback.dtype), fallback))


def _window(centre: torch.Tensor, crop: int, h: int, w: int, grid: torch.Tensor | None = None) -> torch.Tensor:
    """Top-left corners ``[M, 2]`` of ``crop``-sided windows centred on ``centre``, clamped to the frame; with
    ``grid``, each corner is moved by one pixel where needed to lie an even distance from ``grid``."""
    exact = centre - (crop - 1) / 2
    origin = torch.round(exact)
    if grid is not None:
        odd = (origin - grid).remainder(2) == 1
        origin = torch.where(odd, origin + torch.where(exact >= origin, 1.0, -1.0), origin)
    origin = origin.long()
    origin[:, 0].clamp_(0, h - crop)
    origin[:, 1].clamp_(0, w - crop)
    return origin


def locate_digits(frames: torch.Tensor, crop: int = CROP) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the digit of each grey frame ``[M, H, W]`` (in [-1, 1]) is.

    Returns the centroid ``[M, 2]`` (row, col) of the digit's bright pixels (above mid grey, weighted by how far;
    it translates exactly with the digit, for ``moving``) and the top-left corner ``[M, 2]`` of a ``crop`` x
    ``crop`` window around the digit, clamped to the frame:

    1. a first window is centred on the bounding box of the bright pixels (robust to faint noise);
    2. the lit pixels (above ``LIT``, in 2x2 squares, so isolated noise does not count) within ``MARGIN`` px of it
       place the final window: vertically on their bounding box, horizontally on their ink-weighted centroid --
       scikit-learn digits fill their 8x8 box top to bottom and sit left-right by mass, so this finds the original
       8x8 placement more often than a box or a centroid on both axes (98.4% vs 97.7% / 86% of real frames read
       right);
    3. the corner is moved by one pixel where needed to lie an even distance from the lit box's corner: a
       nearest-upscaled digit's box starts on its 2x2 pixel grid, so area-downsampling the window then gives the
       8x8 digit with no block split.

    A frame with no bright pixel gets the frame's centre and a centred window.
    """
    m, h, w = frames.shape
    centre = torch.tensor([(h - 1) / 2, (w - 1) / 2], dtype=frames.dtype).expand(m, 2)
    weight = frames.clamp_min(BRIGHT) - BRIGHT
    mass = weight.sum(dim=(1, 2))
    rows = torch.arange(h, dtype=frames.dtype)
    cols = torch.arange(w, dtype=frames.dtype)
    centroid = torch.stack([(weight.sum(2) * rows).sum(1), (weight.sum(1) * cols).sum(1)], 1)
    centroid = torch.where((mass > 0)[:, None], centroid / mass.clamp_min(1e-12)[:, None], centre)

    top_left, bottom_right = _extent(frames > BRIGHT, centre)
    first = _window((top_left + bottom_right) / 2, crop, h, w)
    r, c = rows[None, :, None], cols[None, None, :]
    near = ((r >= first[:, 0, None, None] - MARGIN) & (r < first[:, 0, None, None] + crop + MARGIN)
            & (c >= first[:, 1, None, None] - MARGIN) & (c < first[:, 1, None, None] + crop + MARGIN))
    lit = (frames > LIT) & near
    top_left, bottom_right = _extent(lit, centre, block=2)
    ink = (frames - LIT).clamp_min(0) * lit
    ink_mass = ink.sum(dim=(1, 2)).clamp_min(1e-12)
    across = (ink.sum(1) * cols).sum(1) / ink_mass
    target = torch.stack([(top_left[:, 0] + bottom_right[:, 0]) / 2, across], 1)
    origin = _window(target, crop, h, w, grid=top_left)
    return centroid, torch.where((mass > 0)[:, None], origin, first)


def _windows(frames: torch.Tensor, origin: torch.Tensor, crop: int) -> torch.Tensor:
    """The ``crop`` windows at ``origin`` ``[M, 2]`` of grey frames ``[M, H, W]``, area-downsampled to
    ``[M, 1, 8, 8]``."""
    offsets = torch.arange(crop)
    r = (origin[:, 0, None] + offsets)[:, :, None]
    c = (origin[:, 1, None] + offsets)[:, None, :]
    windows = frames[torch.arange(len(frames))[:, None, None], r, c]
    return F.avg_pool2d(windows.unsqueeze(1), crop // 8)


def digit_crops(frames: torch.Tensor, crop: int = CROP) -> tuple[torch.Tensor, torch.Tensor]:
    """The located digit of each grey frame ``[M, H, W]`` as ``[M, 1, 8, 8]`` (a ``crop`` window downsampled by
    area), and the frames' centroids ``[M, 2]``."""
    centroid, origin = locate_digits(frames, crop)
    return _windows(frames, origin, crop), centroid


def shows_one_digit(frames: torch.Tensor, origin: torch.Tensor, crop: int = CROP) -> torch.Tensor:
    """Whether each grey frame ``[M, H, W]`` is one digit on a dark background (bool ``[M]``): it has ink (pixels
    above ``LIT``) and at least ``DIGIT_INK`` of it lies in the ``crop`` window at ``origin`` (``locate_digits``).
    Noise, whose ink covers the frame, keeps about window / frame (a quarter) of it there."""
    ink = (frames - LIT).clamp_min(0)
    rows = torch.arange(frames.shape[-2])[None, :, None]
    cols = torch.arange(frames.shape[-1])[None, None, :]
    top, left = origin[:, 0, None, None], origin[:, 1, None, None]
    inside = (rows >= top) & (rows < top + crop) & (cols >= left) & (cols < left + crop)
    total = ink.sum(dim=(1, 2))
    return (total > 0) & ((ink * inside).sum(dim=(1, 2)) >= DIGIT_INK * total)


@torch.no_grad()
def frame_consistency(videos: torch.Tensor, labels: torch.Tensor | None = None,
                      model: DigitsClassifier | None = None, crop: int = CROP) -> dict[str, float | int | None]:
    """Per-frame scores of videos ``[N, F, 1|3, H, W]`` in [-1, 1] that each show one moving digit.

    Every frame's digit is located (:func:`locate_digits`), cropped, downsampled to 8x8 and classified. Returned:

    - ``frame_consistency``: fraction of all frames classified as their clip's requested label;
    - ``clip_consistency``: fraction of clips classified right in every frame (both None without ``labels``);
    - ``digit_frames``: fraction of frames that show one digit on a dark background (:func:`shows_one_digit`);
    - ``label_agreement``: fraction of frames that show one digit, classified with probability >= ``CONFIDENT`` as
      their clip's most frequent prediction (no labels needed; noise, even when the classifier keeps naming one
      class for it, scores near 0);
    - ``moving``: fraction of clips that show one digit in every frame and whose digit's centroid gets at least
      ``MOVING_PX`` (1 px) away from its position in the first frame at some frame (a frozen clip scores 0; a digit
      that bounces back still counts as moving; noise, whose centroid jitters, fails the first condition);
    - ``mean_displacement_px``: the mean over clips of that largest distance;
    - ``num_videos`` and ``frames``.
    """
    grey = _grey_frames(videos, crop)
    n, f = grey.shape[:2]
    flat = grey.reshape(n * f, *grey.shape[2:])
    centroid, origin = locate_digits(flat, crop)
    probs = digits_logits(_windows(flat, origin, crop), model).softmax(1)
    confidence, pred = (t.view(n, f) for t in probs.max(1))
    digit = shows_one_digit(flat, origin, crop).view(n, f)
    centroid = centroid.view(n, f, 2)
    displacement = (centroid - centroid[:, :1]).norm(dim=-1).amax(dim=1)
    majority = pred.mode(dim=1).values
    out: dict[str, float | int | None] = {"num_videos": n, "frames": f, "frame_consistency": None,
                                          "clip_consistency": None}
    if labels is not None:
        labels = torch.as_tensor(labels).reshape(-1).cpu().long()
        if len(labels) != n:
            raise ShapeError(f"{n} videos but {len(labels)} labels")
        right = pred == labels[:, None]
        out["frame_consistency"] = right.float().mean().item()
        out["clip_consistency"] = right.all(dim=1).float().mean().item()
    out["digit_frames"] = digit.float().mean().item()
    agree = (pred == majority[:, None]) & (confidence >= CONFIDENT) & digit
    out["label_agreement"] = agree.float().mean().item()
    out["moving"] = ((displacement >= MOVING_PX) & digit.all(dim=1)).float().mean().item()
    out["mean_displacement_px"] = displacement.mean().item()
    return out


@torch.no_grad()
def video_digit_features(videos: torch.Tensor, model: DigitsClassifier | None = None,
                         crop: int = CROP) -> torch.Tensor:
    """Classifier features ``[N * F, 64]`` of every frame's located 8x8 digit (for a Fréchet distance)."""
    grey = _grey_frames(videos, crop)
    crops, _ = digit_crops(grey.flatten(0, 1), crop)
    return digits_features(crops, model)


if __name__ == "__main__":
    from safetensors.torch import save_file

    from ..data.digits import digits_arrays

    trained = train_digits_classifier(0)
    WEIGHTS.parent.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(WEIGHTS))
    x_test, y_test = digits_arrays("test", 8)
    print(f"wrote {WEIGHTS}; test accuracy {digits_accuracy(x_test, y_test, trained):.4f}")
