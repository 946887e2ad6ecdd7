"""``dtx eval``: score a sample archive written by ``dtx sample`` against the real digits.

The archive holds ``arr_0`` (uint8 NHWC images or NFHWC videos, from clamp(127.5 x + 128, 0, 255)) and ``labels``
(int64 [N], the requested classes). Reported for images: the digits classifier's accuracy on the requested labels,
the Fréchet distance to the real digits in the classifier's feature space, and FID when torchmetrics and local
Inception weights are available. For videos of one moving digit (Latte's ``moving-digits``), every frame's digit is
located and classified (``dtx.evaluation.digits.frame_consistency``): the fraction of frames showing the requested
digit, of clips right in every frame, of frames showing one digit on a dark background, of those frames confidently
agreeing with their clip, and of clips whose one digit moves; the Fréchet distance uses the located digits. Every
score is printed with the number of samples (images, frames or clips) it was computed on.
"""

from __future__ import annotations

import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from ..writers import quantize

SKIP_PARTS = {"checkpoints", ".tmp"}


def find_samples(path: str | Path) -> Path:
    """``path`` itself if it is an ``.npz``; for a folder, its newest ``.npz`` outside ``checkpoints/``."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix != ".npz":
            raise DataError(f"{path} is not a .npz sample archive")
        return path
    if not path.is_dir():
        raise DataError(f"no such sample archive or run folder: {path}")
    found = [p for p in path.rglob("*.npz") if not SKIP_PARTS & set(p.relative_to(path).parts)]
    if not found:
        raise DataError(f"no .npz sample archive under {path}; write one with `dtx sample`")
    return max(found, key=lambda p: (p.stat().st_mtime, p.name))


def load_samples(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 images ``[N, C, H, W]`` (or videos ``[N, F, C, H, W]`` from NFHWC) and the requested labels (None if the
    archive has none) from an ``.npz``."""
    from ..file_headers import npz_members

    try:
        npz_members(path)  # declared array sizes checked against the file before np.load allocates them
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"cannot read sample archive {path}: {exc}") from exc
    if "arr_0" not in arrays:
        raise DataError(f"{path} has no 'arr_0' array (found: {', '.join(arrays) or 'nothing'})")
    arr = arrays["arr_0"]
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.dtype != np.uint8 or arr.ndim not in (4, 5) or arr.shape[-1] not in (1, 3) or 0 in arr.shape:
        raise DataError(f"{path}: arr_0 must be non-empty uint8 NHWC (images) or NFHWC (videos) with 1 or 3 "
                        f"channels, got {arr.dtype} {arr.shape}")
    images = torch.from_numpy(arr).movedim(-1, -3).contiguous()
    labels = arrays.get("labels")
    if labels is None:
        return images, None
    if labels.ndim != 1 or len(labels) != len(arr) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: labels must be integers [N={len(arr)}], got {labels.dtype} {labels.shape}")
    return images, torch.from_numpy(labels.astype(np.int64))


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 back to [-1, 1]: u / 127.5 - 1 (the centre of each value's bin under clamp(127.5 x + 128))."""
    return images.float() / 127.5 - 1.0


to_uint8 = quantize  # the archives' quantisation lives in dtx.writers


@lru_cache(maxsize=3)
def reference_stats(reference: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the classifier features of one real digits split (cached per process)."""
    from ..data.digits import digits_arrays
    from .digits import digits_features
    from .frechet import feature_stats

    return feature_stats(digits_features(digits_arrays(reference, 8)[0]))


def digits_scores(images: torch.Tensor, labels: torch.Tensor, reference: str = "train") -> dict[str, float]:
    """Digits-classifier accuracy and Frechet distance in its features (against the real ``reference`` split) of
    generated digits in [-1, 1], quantised to uint8 first as archives store them (the scores of ``dtx eval``)."""
    from .digits import digits_accuracy, digits_features
    from .frechet import feature_stats, frechet_distance_from_stats

    x = to_unit(quantize(images))
    return {"accuracy": digits_accuracy(x, labels),
            "fd": frechet_distance_from_stats(*feature_stats(digits_features(x)), *reference_stats(reference))}


def evaluate_samples(path: str | Path, reference: str = "train",
                     inception_weights: str | Path | None = None) -> dict[str, Any]:
    """Scores of one sample archive (or a run folder's newest) as a JSON-ready dict."""
    from ..data.digits import NUM_CLASSES, digits_arrays
    from .digits import digits_accuracy, digits_features
    from .fid import compute_fid, fid_unavailable_reason
    from .frechet import feature_stats, frechet_distance_from_stats

    archive = find_samples(path)
    images, labels = load_samples(archive)
    if images.dim() == 5:
        return _evaluate_videos(archive, images, labels, reference)
    n, c, h, w = images.shape
    if h != w or h % 8:
        raise DataError(f"{archive}: digits evaluation needs square images with a side that is a multiple of 8, "
                        f"got {h}x{w}")
    x = to_unit(images)
    test_x, test_y = digits_arrays("test", 8)
    real_stats = reference_stats(reference)
    result: dict[str, Any] = {"path": str(archive), "kind": "images", "num_samples": n, "image_shape": [c, h, w],
                              "reference_samples": len(digits_arrays(reference, 8)[1]), "test_samples": len(test_y)}
    if labels is not None:
        _check_labels(archive, labels, NUM_CLASSES)
        result["accuracy"] = digits_accuracy(x, labels)
    else:
        result["accuracy"] = None
    result["classifier_test_accuracy"] = digits_accuracy(test_x, test_y)
    result["fd_digits"] = None
    if n >= 2:
        result["fd_digits"] = frechet_distance_from_stats(*feature_stats(digits_features(x)), *real_stats)
    result["fd_reference"] = f"digits/{reference}"
    if reference != "test":
        result["fd_real_test_baseline"] = frechet_distance_from_stats(*reference_stats("test"), *real_stats)
    reason = fid_unavailable_reason(inception_weights)
    result["fid"], result["fid_skipped"] = None, reason
    if reason is None:
        real_x = digits_arrays(reference, 8)[0]
        real_uint8 = quantize(real_x.repeat_interleave(h // 8, dim=-2).repeat_interleave(h // 8, dim=-1))
        result["fid"] = compute_fid(real_uint8, images, inception_weights)
    return result


def _check_labels(archive: Path, labels: torch.Tensor, num_classes: int) -> None:
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"{archive}: labels must be digit classes 0..{num_classes - 1}, got range "
                        f"{labels.min().item()}..{labels.max().item()}")


def _evaluate_videos(archive: Path, videos: torch.Tensor, labels: torch.Tensor | None,
                     reference: str) -> dict[str, Any]:
    """Scores of uint8 videos ``[N, F, C, H, W]`` that each show one moving digit (see ``frame_consistency``)."""
    from ..data.digits import NUM_CLASSES, digits_arrays
    from .digits import CROP, digits_accuracy, frame_consistency, video_digit_features
    from .frechet import feature_stats, frechet_distance_from_stats

    n, f, c, h, w = videos.shape
    if h < CROP or w < CROP:
        raise DataError(f"{archive}: video evaluation crops a {CROP}x{CROP} digit from each frame; frames are only "
                        f"{h}x{w}")
    if labels is not None:
        _check_labels(archive, labels, NUM_CLASSES)
    x = to_unit(videos)
    scores = frame_consistency(x, labels)
    test_x, test_y = digits_arrays("test", 8)
    real_stats = reference_stats(reference)
    result: dict[str, Any] = {"path": str(archive), "kind": "videos", "num_samples": n, "num_frames": n * f,
                              "video_shape": [f, c, h, w], "reference_samples": len(digits_arrays(reference, 8)[1]),
                              "test_samples": len(test_y)}
    result.update({k: v for k, v in scores.items() if k not in ("num_videos", "frames")})
    result["accuracy"] = scores["frame_consistency"]  # per-frame accuracy on the requested labels
    result["classifier_test_accuracy"] = digits_accuracy(test_x, test_y)
    result["fd_digits"] = None
    if n * f >= 2:
        result["fd_digits"] = frechet_distance_from_stats(*feature_stats(video_digit_features(x)), *real_stats)
    result["fd_reference"] = f"digits/{reference}"
    if reference != "test":
        result["fd_real_test_baseline"] = frechet_distance_from_stats(*reference_stats("test"), *real_stats)
    result["fid"], result["fid_skipped"] = None, "not computed for videos"
    return result
