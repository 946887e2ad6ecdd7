"""Evaluation-scale sample sets: ``dtx sample SOURCE --num-samples N --out samples.npz``.

One ``.npz`` in the ADM evaluation suite's format (``arr_0`` uint8 NHWC, or NFHWC for videos, as DiT's
``sample_ddp.py`` writes), plus ``seeds`` (each sample's own seed) and ``labels`` or ``prompts``. Sample ``i`` depends
on ``i`` alone: its subject is subject ``i mod K`` of the request (the classes, the prompts, or every class of a class
model), its noise, initial and ancestral, comes from its own generator seeded ``seed * 2**32 + i``, so the set is
the same however it is split across workers, and any sample can be regenerated alone (to float rounding when its
batch differs). The set is cut into chunks of ``batch_size`` consecutive samples, each written atomically into the
parts folder ``<out>.parts/`` as it finishes; a killed run started again samples only the chunks that are missing.
When every chunk is there they are joined into ``<out>`` and the parts folder is removed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..conditioning import SampleRequest
from ..config import load_config
from ..errors import ConfigError
from .config import SampleConfig, config_dict

PARTS_SUFFIX = ".parts"
PLAN_FILE = "plan.json"
SEED_STRIDE = 2 ** 32  # sample i of a set with seed s is drawn with seed s * SEED_STRIDE + i


@dataclass(frozen=True)
class SampleSetPlan:
    """Everything that decides the samples of a set; two runs with equal plans write equal sets."""

    num_samples: int
    seed: int
    batch_size: int
    classes: tuple[int, ...] = ()
    prompts: tuple[str, ...] = ()
    negative_prompt: Optional[str] = None
    flags: dict[str, bool] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # source, weights and the resolved sample config

    def seeds(self, start: int, end: int) -> list[int]:
        return [self.seed * SEED_STRIDE + i for i in range(start, end)]

    def chunks(self) -> list[tuple[int, int]]:
        return [(s, min(s + self.batch_size, self.num_samples)) for s in range(0, self.num_samples, self.batch_size)]

    def request(self, start: int, end: int) -> SampleRequest:
        """The request of samples ``start..end-1``, one sample per listed subject, cycling through the subjects."""
        classes = [self.classes[i % len(self.classes)] for i in range(start, end)] if self.classes else []
        prompts = [self.prompts[i % len(self.prompts)] for i in range(start, end)] if self.prompts else []
        return SampleRequest(classes=classes, prompts=prompts, negative_prompt=self.negative_prompt,
                             flags=dict(self.flags))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SampleSetPlan":
        return cls(**{**d, "classes": tuple(d.get("classes", ())), "prompts": tuple(d.get("prompts", ()))})


@dataclass(frozen=True)
class SampleSetJob:
    """What one sampling process (this one, or a Ray worker) needs to rebuild the model and sample its chunks."""

    plan: SampleSetPlan
    out: str
    source: str
    sample: dict[str, Any]  # the resolved SampleConfig as a dict
    weights: str = "ema"
    trust: bool = False
    format: Optional[str] = None
    device: str = "cpu"
    adapter: Optional[str] = None
    adapter_scale: Optional[float] = None
    vae: Optional[str] = None
    precision: str = "fp32"
    compile: bool = False
    progress: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SampleSetJob":
        return cls(**{**d, "plan": SampleSetPlan.from_dict(d["plan"])})


def make_plan(num_samples: int, seed: int, batch_size: int, request: SampleRequest, num_classes: int,
              settings: dict[str, Any]) -> SampleSetPlan:
    """The plan of a set: the request's classes or prompts, else every class of a class model (balanced, as the
    FID-50K sets of class-conditional models), else unconditional samples."""
    if num_samples < 1:
        raise ConfigError(f"--num-samples must be at least 1, got {num_samples}")
    classes = tuple(request.classes) or (tuple(range(num_classes)) if num_classes and not request.prompts else ())
    return SampleSetPlan(num_samples, int(seed), batch_size, classes, tuple(request.prompts), request.negative_prompt,
                         dict(request.flags), settings)


def parts_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + PARTS_SUFFIX)


def _chunk_path(parts: Path, index: int) -> Path:
    return parts / f"chunk-{index:06d}.npz"


def open_parts(out: str | Path, plan: SampleSetPlan) -> Path:
    """The parts folder of ``out`` holding ``plan``: created with the plan, or an earlier run's with the same plan
    (resumed); one holding another plan is an error naming it (nothing is overwritten)."""
    from ..io import atomic_write_text

    parts = parts_dir(out)
    plan_file = parts / PLAN_FILE
    if plan_file.is_file():
        try:
            stored = SampleSetPlan.from_dict(json.loads(plan_file.read_text()))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{plan_file}: not a sample-set plan ({exc}); remove {parts} to start the set anew")
        if stored != plan:
            changed = sorted(k for k, v in dataclasses.asdict(plan).items() if dataclasses.asdict(stored)[k] != v)
            raise ConfigError(f"{plan_file}: a partly written sample set with other settings ({', '.join(changed)}) "
                              f"is in the way; finish it with its own settings, remove {parts}, or choose another "
                              f"--out")
        return parts
    if parts.exists() and any(parts.iterdir()):
        raise ConfigError(f"{parts}: exists without {PLAN_FILE}; remove it or choose another --out")
    atomic_write_text(plan_file, plan.to_json())
    return parts


def _chunk_done(path: Path, start: int, end: int, plan: SampleSetPlan) -> bool:
    """A chunk file is done when it opens and holds exactly the seeds of its samples (a torn or foreign file is
    sampled again)."""
    try:
        with np.load(path) as z:
            return z["seeds"].tolist() == plan.seeds(start, end) and len(z["arr_0"]) == end - start
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return False


def pending_chunks(parts: Path, plan: SampleSetPlan) -> list[int]:
    """Indices of the chunks without a finished file."""
    return [k for k, (s, e) in enumerate(plan.chunks()) if not _chunk_done(_chunk_path(parts, k), s, e, plan)]


def write_chunk(parts: Path, index: int, x: torch.Tensor, seeds: list[int], labels: list[int] | None,
                prompts: list[str] | None, channel_dim: int) -> Path:
    from ..io import atomic_write
    from ..writers import to_uint8

    arrays: dict[str, np.ndarray] = {"arr_0": to_uint8(x, channel_dim), "seeds": np.asarray(seeds, dtype=np.int64)}
    if labels:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    if prompts:
        arrays["prompts"] = np.asarray(prompts)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return atomic_write(_chunk_path(parts, index), write)


def assemble(out: str | Path, plan: SampleSetPlan) -> dict[str, Any]:
    """Join the finished chunks into ``out`` (written atomically) and remove the parts folder; an unfinished set
    is an error naming the chunks it lacks."""
    from ..io import atomic_write

    parts = parts_dir(out)
    missing = pending_chunks(parts, plan)
    if missing:
        raise ConfigError(f"{parts}: {len(missing)} of {len(plan.chunks())} chunks are not written yet "
                          f"(first: {missing[0]}); run the same command again to finish the set")
    arrays: dict[str, list[np.ndarray]] = {}
    for k in range(len(plan.chunks())):
        with np.load(_chunk_path(parts, k)) as z:
            for key in z.files:
                arrays.setdefault(key, []).append(z[key])
    joined = {k: np.concatenate(v) for k, v in arrays.items()}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **joined)

    path = atomic_write(out, write)
    shutil.rmtree(parts)
    return {"npz": str(path), "n": int(len(joined["arr_0"])), "shape": list(joined["arr_0"].shape)}


# -- sampling the chunks ------------------------------------------------------------------------------------------------

def share(pending: list[int], rank: int, world: int) -> list[int]:
    """The chunks process ``rank`` of ``world`` samples: every ``world``-th of the pending list, which the caller
    computes once before any process starts (a list read while others write would shift under them)."""
    return pending[rank::world]


def run_job(job: SampleSetJob, chunks: list[int] | None = None, rank: int = 0) -> dict[str, Any]:
    """Sample ``chunks`` (default: every missing one) of the job's set into its parts folder; returns the counts.
    Each process rebuilds the model from the job (the same weights, adapter and settings everywhere)."""
    from ..adapters import apply_adapter
    from .sampling import generate, load_for_sampling, precision_context, samples_bar

    plan, parts = job.plan, parts_dir(job.out)
    todo = pending_chunks(parts, plan) if chunks is None else list(chunks)
    if not todo:
        return {"rank": rank, "chunks": 0, "samples": 0}
    device = torch.device(job.device)
    setup = load_for_sampling(job.source, weights=job.weights, trust=job.trust, device=device, format=job.format)
    apply_adapter(setup.model, job.adapter, job.adapter_scale)
    if job.compile:
        setup = dataclasses.replace(setup, model=torch.compile(setup.model))
    vae = _load_vae(job.vae, device)
    sample = load_config(SampleConfig, job.sample)
    chunks = plan.chunks()
    done, t0 = 0, time.perf_counter()
    bar = samples_bar(job.progress, sum(chunks[k][1] - chunks[k][0] for k in todo), setup.info.frames is not None)
    for k in todo:
        start, end = chunks[k]
        request = plan.request(start, end)
        seeds = plan.seeds(start, end)
        with precision_context(job.precision, device):
            out = generate(setup, request, sample, per_subject=1, batch_size=plan.batch_size, vae=vae, seeds=seeds)
        write_chunk(parts, k, out.x, seeds, request.classes or None, request.prompts or None, out.channel_dim)
        done += end - start
        if bar is not None:
            bar.update(end - start)
    if bar is not None:
        bar.close()
    return {"rank": rank, "chunks": len(todo), "samples": done, "seconds": round(time.perf_counter() - t0, 2)}


def _load_vae(path: str | None, device: torch.device) -> Any:
    if not path:
        return None
    from ..data.vae import load_vae

    return load_vae(path).to(device)


def sample_settings(source: str, weights: str, sample: SampleConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """The settings recorded in a plan: a resumed set must be sampled with the same ones."""
    return {"source": str(Path(source).resolve()), "weights": weights, "sample": config_dict(sample), **extra}
