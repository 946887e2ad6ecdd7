"""Building a run: every part the training loop needs (data, model, conditioning stage, EMA, objective, optimizer,
checkpoint manager, the wrapped and compiled model), assembled and checked before anything is written; the loop
(``dtx.training.trainer``) only trains."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import RUN_CHECKPOINTS, CheckpointManager
from ..conditioning import ConditioningStage
from ..cpu import ThreadGovernor, requested_threads, resolve_cpu_bf16
from ..data.info import DataInfo
from ..errors import ConfigError
from ..finetune import prepare as prepare_finetune, resolve_source
from ..layers.blocks import recompute_policy, set_recompute
from ..models import create_model, model_spec
from .checks import check_bucket_shapes, check_run, check_sampler, data_classes
from .compile import compile_model
from .config import TrainConfig
from .context import RunContext
from .ema import EMA
from .model_setup import RunData, build_run_data, model_overrides
from .objectives import Objective, build_objective
from .optim import build_optimizer
from .parallel import ParallelPlan, plan_parallel
from .seeding import seed_everything
from .sharding import is_sharded, shard_like

log = logging.getLogger(__name__)


@dataclass
class RunParts:
    """What one worker's training loop runs with. ``raw`` holds the parameters (sharded under FSDP); ``model`` is
    what the loop calls (``raw`` wrapped for data parallelism and compiled when asked)."""

    device: torch.device
    micro_batch: int  # samples per forward on this worker
    autocast: bool  # bf16 autocast for the step
    threads: ThreadGovernor | None  # CPU runs: torch threads kept at the cores other processes leave free
    data: RunData
    data_classes: list[str] | None
    model_spec: dict[str, Any]
    raw: nn.Module
    model: nn.Module
    ema: EMA
    stage: ConditioningStage
    objective: Objective
    optimizer: torch.optim.Optimizer
    ckpts: CheckpointManager
    sharded: bool
    resume: Path | None  # the checkpoint this run continues from
    parallel: ParallelPlan  # this rank's data rank and world, and its context group
    bucket_batches: list[int] | None = None  # micro-batch of each size bucket (data.buckets), else None

    @property
    def info(self) -> DataInfo:
        return self.data.info

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in self.raw.parameters() if p.requires_grad]


def build_model(cfg: TrainConfig, info: DataInfo) -> nn.Module:
    """The run's model, freshly initialised: the recipe's options plus what the data decides (size, channels, ...)."""
    return create_model(cfg.model.name, **model_overrides(cfg, info))


def micro_batch(cfg: TrainConfig, data_world: int) -> int:
    """Samples per forward on one worker: the batch split over data-parallel ranks (workers / parallel.context) and
    accumulation steps, exactly."""
    if data_world * cfg.grad_accum > cfg.data.batch_size or cfg.data.batch_size % (data_world * cfg.grad_accum):
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} must be a multiple of data-parallel ranks x "
                          f"grad_accum = {data_world} x {cfg.grad_accum}")
    return cfg.data.batch_size // (data_world * cfg.grad_accum)


def _initial_model(cfg: TrainConfig, info: DataInfo, ctx: RunContext, resume: Path | None) -> nn.Module:
    """The model with the same initial weights on every rank, ``model.init_from`` applied (not when resuming: the
    checkpoint holds the run's own weights), ``finetune`` applied (base weights, adapters, what trains) and
    activation recomputation as ``recompute`` asks."""
    seed_everything(cfg.seed)
    model = build_model(cfg, info)
    if cfg.model.init_from and resume is None:
        from ..init_weights import init_weights

        report = init_weights(model, cfg.model.init_from)
        if ctx.is_main:
            print(report.summary(), file=sys.stderr, flush=True)
    tuned = prepare_finetune(model, cfg.finetune, load_weights=resume is None)
    if tuned is not None and ctx.is_main:
        print(tuned.summary(), file=sys.stderr, flush=True)
    set_recompute(model, recompute_policy(cfg.recompute))
    return model


def _bucket_batches(cfg: TrainConfig, data: RunData, model: nn.Module, micro: int, data_world: int
                    ) -> list[int] | None:
    """Each size bucket's micro-batch (``data.buckets.max_tokens`` over its tokens in the model's input space),
    after checking that the model takes every bucket shape and that an epoch fills at least one global batch."""
    if cfg.data.buckets is None:
        return None
    from ..data.buckets import BucketBatches, batch_sizes
    from .data_stream import epoch_permutation

    pixels = data.dataset.buckets  # type: ignore[attr-defined]
    scale = data.info.height / pixels[0][-2]  # a VAE's downsampling (1 for pixel models)
    shapes = [(*b[:-2], round(b[-2] * scale), round(b[-1] * scale)) for b in pixels]
    check_bucket_shapes(model, shapes, data.info.channels)
    patch = getattr(model, "patch_size", None) or getattr(getattr(model, "config", None), "patch_size", 1)
    sizes = batch_sizes(shapes, cfg.data.buckets.max_tokens, patch if isinstance(patch, int) else patch[0], micro)
    bucket_of = data.dataset.bucket_of  # type: ignore[attr-defined]
    if BucketBatches(bucket_of, sizes, 0, data_world, epoch_permutation(len(bucket_of), cfg.seed, 0)).count == 0:
        raise ConfigError("bad value for config key 'data.buckets': no bucket fills one global batch (its "
                          "micro-batch x data-parallel ranks) in an epoch; lower max_tokens or use fewer buckets")
    return sizes


def build_run(cfg: TrainConfig, ctx: RunContext) -> RunParts:
    """Every part of the run in ``ctx``'s worker, each checked (labels, sampling settings, sampler options) before
    anything is written."""
    device = torch.device(ctx.device)
    parallel = plan_parallel(cfg.parallel.context, ctx)
    batch = micro_batch(cfg, parallel.data_world)
    if device.type == "cuda" and cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = cfg.precision == "bf16" and (device.type == "cuda"
                                            or (device.type == "cpu" and resolve_cpu_bf16(cfg.cpu_bf16)))
    threads = ThreadGovernor(torch.get_num_threads(), fixed=requested_threads()) if device.type == "cpu" else None
    resolve_source(cfg.finetune)  # the stored config finds the base from any working directory
    data = build_run_data(cfg, device)
    resume = ctx.resume_checkpoint()
    model = _initial_model(cfg, data.info, ctx, resume)
    spec = model_spec(model)
    stage = ConditioningStage.build(cfg.conditioning, model, data.info).to(device)
    ema = EMA(model, cfg.ema)  # before the split: the EMA copy samples in one process
    parallel.apply(model)
    raw = model.to(device)
    ema.model.to(device)
    wrapped = ctx.prepare_model(raw)  # before the optimizer: FSDP replaces the parameters by their shards
    sharded = is_sharded(raw)
    if sharded:
        shard_like(ema.model, raw)
    objective = build_objective(cfg.objective, raw, data.info)
    check_sampler(cfg.sample, objective.kind)  # fail now, not after training
    check_run(cfg, data.info, raw, stage)  # labels vs classes, sampling settings: before any write
    buckets = _bucket_batches(cfg, data, raw, batch, parallel.data_world)
    optimizer = build_optimizer(raw, cfg.optim)
    ckpts = CheckpointManager(Path(ctx.out_dir) / RUN_CHECKPOINTS, keep_last=cfg.keep_last,
                              milestone_every=cfg.milestone_every or None)
    compiled, eager = compile_model(wrapped, cfg.compile, device)
    if eager is not None and cfg.compile and ctx.is_main:
        log.warning("model not compiled: %s", eager)
    return RunParts(device, batch, autocast, threads, data, data_classes(data.dataset), spec, raw, compiled, ema,
                    stage, objective, optimizer, ckpts, sharded, resume, parallel, buckets)
