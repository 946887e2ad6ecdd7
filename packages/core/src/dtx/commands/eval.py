"""``dtx eval SAMPLES``: score a samples ``.npz`` (or a run folder's newest) with ``dtx.evaluation.report`` and print
a table (digits accuracy, Frechet distance, FID; for videos frame consistency and motion) or one JSON object."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..evaluation.report import evaluate_samples


def _fd_line(result: dict[str, Any], what: str) -> str:
    """The Fréchet distance with both sample counts, the reference split and the real test digits' own score."""
    fd = "n/a" if result["fd_digits"] is None else f"{result['fd_digits']:.4f}"
    base = result.get("fd_real_test_baseline")
    return (f"{fd}  ({what} vs {result['reference_samples']} real {result['fd_reference']}"
            + (f"; the {result['test_samples']} real test digits score {base:.4f})" if base is not None else ")"))


def _classifier(result: dict[str, Any]) -> str:
    return f"classifier on the {result['test_samples']} real test digits: {result['classifier_test_accuracy']:.4f}"


def _print_videos(result: dict[str, Any]) -> None:
    from ..evaluation.digits import CONFIDENT, MOVING_PX

    f, c, h, w = result["video_shape"]
    clips, frames = f"{result['num_samples']} videos", f"{result['num_frames']} frames"
    print(f"samples            {result['path']} ({clips}, {f} frames of {c}x{h}x{w})")
    if result["frame_consistency"] is None:
        print("frame_consistency  n/a (archive has no labels)")
        print("clip_consistency   n/a (archive has no labels)")
    else:
        print(f"frame_consistency  {result['frame_consistency']:.4f}  ({frames} classified as the requested digit; "
              f"{_classifier(result)})")
        print(f"clip_consistency   {result['clip_consistency']:.4f}  ({clips}: right in every frame)")
    print(f"digit_frames       {result['digit_frames']:.4f}  ({frames}: one digit on a dark background)")
    print(f"label_agreement    {result['label_agreement']:.4f}  ({frames}: one digit, classified with probability "
          f">= {CONFIDENT:g} as their clip's majority class)")
    print(f"moving             {result['moving']:.4f}  ({clips}: one digit in every frame, its centre of mass moving "
          f">= {MOVING_PX:g} px; mean largest displacement {result['mean_displacement_px']:.2f} px)")
    print(f"fd_digits          {_fd_line(result, frames + ' (located digits)')}")
    print(f"fid                skipped: {result['fid_skipped']}")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="samples .npz written by `dtx sample`, or a run folder (its newest .npz is used)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--reference", choices=("train", "test", "all"), default="train",
                   help="real digits split for the Fréchet distance and FID (default: train)")
    p.add_argument("--inception-weights", default=None,
                   help="local torch-fidelity Inception weights for FID (default: $DTX_INCEPTION_WEIGHTS)")


def run(args: argparse.Namespace) -> int:
    result = evaluate_samples(args.path, args.reference, args.inception_weights)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if result["kind"] == "videos":
        _print_videos(result)
        return 0
    c, h, w = result["image_shape"]
    n = f"{result['num_samples']} samples"
    print(f"samples    {result['path']} ({result['num_samples']} images, {c}x{h}x{w})")
    acc = "n/a (archive has no labels)" if result["accuracy"] is None else f"{result['accuracy']:.4f}"
    print(f"accuracy   {acc}  ({n}; {_classifier(result)})")
    print(f"fd_digits  {_fd_line(result, n)}")
    fid = (f"{result['fid']:.4f}  ({n} vs {result['reference_samples']} real {result['fd_reference']})"
           if result["fid"] is not None else f"skipped: {result['fid_skipped']}")
    print(f"fid        {fid}")
    return 0
