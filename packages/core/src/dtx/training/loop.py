"""The training loop every backbone and runner shares: data -> (frozen VAE encode) -> objective loss -> AdamW ->
clipping -> EMA, with metrics, checkpoints, sample grids and exact resume.

Randomness is re-seeded at every step from (seed, rank, step), and the data order is a seeded permutation per epoch
split by rank, so a run resumed from a checkpoint continues exactly as the uninterrupted one would have (bitwise on
CPU with ``data.num_workers=0``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .. import plugins
from ..config import to_yaml
from ..errors import ConfigError, TrainingError
from .config import TrainConfig, config_dict
from .context import RunContext
from .ema import EMA
from .objectives import Objective, build_objective, sampler_entry
from .optim import build_optimizer, lr_at, set_lr
from .sample import default_classes, generate, save_grid

log = logging.getLogger(__name__)

SAMPLE_SEED = 0  # periodic grids always use the same noise, so they show progress rather than luck


# -- seeding and data order -----------------------------------------------------------------------------------------

STEP, DATA_ORDER, LOADER = 0, 1, 2  # what a derived seed is for


def derive_seed(seed: int, purpose: int, *keys: int) -> int:
    """A well-mixed 63-bit seed for (run seed, purpose, rank/step/epoch ...), all non-negative integers."""
    entropy = [seed % 2**63, purpose, *keys]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class EpochBatches:
    """Batch sampler for one epoch: a seeded permutation cut into global micro-batches (drop_last), of which this
    rank takes its slice, starting at micro-batch ``start`` (the resume position)."""

    def __init__(self, n: int, micro_batch: int, rank: int, world_size: int, seed: int, epoch: int,
                 start: int = 0) -> None:
        self.global_batch = micro_batch * world_size
        self.count = n // self.global_batch
        self.micro_batch, self.rank, self.start = micro_batch, rank, start
        self.perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, DATA_ORDER, epoch)))

    def __len__(self) -> int:
        return max(0, self.count - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(self.start, self.count):
            lo = b * self.global_batch + self.rank * self.micro_batch
            yield self.perm[lo:lo + self.micro_batch].tolist()


@dataclass
class DataPosition:
    """Where the loader stands: epoch and the next micro-batch within it."""

    epoch: int = 0
    batch: int = 0


class DataStream:
    """Endless micro-batches over epochs, resumable from a ``DataPosition``."""

    def __init__(self, dataset: Dataset, cfg: TrainConfig, ctx: RunContext, micro_batch: int,
                 position: DataPosition) -> None:
        from ..data import collate

        self.dataset, self.cfg, self.ctx, self.micro_batch = dataset, cfg, ctx, micro_batch
        self.collate = collate
        self.pos = position
        n = len(dataset)  # type: ignore[arg-type]
        if n < micro_batch * ctx.world_size:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} is larger than the dataset ({n} items)")
        self._it: Iterator[dict[str, Any]] | None = None

    def _open(self) -> None:
        sampler = EpochBatches(len(self.dataset), self.micro_batch, self.ctx.rank,  # type: ignore[arg-type]
                               self.ctx.world_size, self.cfg.seed, self.pos.epoch, self.pos.batch)
        loader = DataLoader(self.dataset, batch_sampler=sampler, collate_fn=self.collate,
                            num_workers=self.cfg.data.num_workers,
                            generator=torch.Generator().manual_seed(derive_seed(self.cfg.seed, LOADER, self.pos.epoch)),
                            pin_memory=self.ctx.device.type == "cuda")
        self._it = iter(self.ctx.prepare_loader(loader))

    def next(self) -> dict[str, Any]:
        while True:
            if self._it is None:
                self._open()
            try:
                batch = next(self._it)  # type: ignore[arg-type]
            except StopIteration:
                self._it = None
                self.pos = DataPosition(self.pos.epoch + 1, 0)
                continue
            self.pos = DataPosition(self.pos.epoch, self.pos.batch + 1)
            return batch


# -- model set-up ---------------------------------------------------------------------------------------------------

def _model_options(name: str) -> set[str] | None:
    """Keyword options a registered model factory accepts (None: anything)."""
    import dataclasses

    factory = plugins.get("model", name).obj
    cfg_cls = getattr(factory, "config_class", None)
    if cfg_cls is not None:
        return {f.name for f in dataclasses.fields(cfg_cls)}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


def model_overrides(cfg: TrainConfig, data_info: dict[str, Any]) -> dict[str, Any]:
    """The recipe's model options plus input size, channels and classes taken from the data where not given."""
    options = dict(cfg.model.options)
    accepted = _model_options(cfg.model.name)
    derived = {"input_size": data_info["image_size"], "in_channels": data_info["channels"],
               "num_classes": data_info["num_classes"]}
    for key, value in derived.items():
        if key not in options and (accepted is None or key in accepted):
            options[key] = value
    return options


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each transformer block in the backward pass; uses the model's own switch when it has one.

    Otherwise every module inside a ``blocks`` ModuleList gets a checkpointed forward (state-dict keys unchanged).
    Returns the number of wrapped blocks (-1 when the model handled it).
    """
    from torch.utils.checkpoint import checkpoint

    for switch in ("set_grad_checkpointing", "enable_gradient_checkpointing"):
        if callable(getattr(model, switch, None)):
            getattr(model, switch)()
            return -1
    if isinstance(getattr(model, "gradient_checkpointing", None), bool):
        model.gradient_checkpointing = True
        return -1
    wrapped = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "blocks" and isinstance(module, nn.ModuleList):
            for block in module:
                block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
                wrapped += 1
    if not wrapped:
        log.warning("activation checkpointing requested but %s has no `blocks` list; ignored", type(model).__name__)
    return wrapped


def _data_info(dataset: Any, vae: Any) -> dict[str, Any]:
    info = {"channels": int(dataset.channels), "image_size": int(dataset.image_size),
            "num_classes": int(getattr(dataset, "num_classes", 0) or 0), "is_latent": bool(dataset.is_latent),
            "latent_scale": float(getattr(dataset, "latent_scale", 0.0) or 0.0) or None, "vae": None}
    if vae is not None:
        from ..data.extract import vae_factors

        down = 2 ** (len(vae.config.block_out_channels) - 1)
        info.update(channels=int(vae.config.latent_channels), image_size=int(dataset.image_size) // down,
                    is_latent=True, latent_scale=vae_factors(vae)[0])
    return info


# -- metrics and plots ----------------------------------------------------------------------------------------------

class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (main rank only)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def rewind(self, step: int) -> None:
        """Drop records past ``step`` (written after the checkpoint a resumed run restarts from) and torn lines."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line + "\n")
            except (ValueError, AttributeError):
                continue
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(self.path)


def plot_loss(metrics_path: Path, out: Path) -> Path | None:
    """``loss.png``: logged loss against step (log scale), from ``metrics.jsonl``."""
    if not metrics_path.is_file():
        return None
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r and r["loss"] is not None and math.isfinite(r["loss"])]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


# -- the loop -------------------------------------------------------------------------------------------------------

def _grad_norm(params: list[nn.Parameter], clip: float) -> torch.Tensor:
    grads = [p for p in params if p.grad is not None]
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(grads, clip)
    return torch.nn.utils.get_total_norm([p.grad for p in grads])  # type: ignore[misc]


class Trainer:
    """State of one worker's run; ``train(cfg, ctx)`` builds it and calls ``run()``."""

    def __init__(self, cfg: TrainConfig, ctx: RunContext) -> None:
        from ..checkpoint import CheckpointManager
        from ..data import build_dataset

        self.cfg, self.ctx = cfg, ctx
        self.device = torch.device(ctx.device)
        self.out = Path(ctx.out_dir)
        if ctx.world_size * cfg.grad_accum > cfg.data.batch_size or \
                cfg.data.batch_size % (ctx.world_size * cfg.grad_accum):
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} must be a multiple of workers x grad_accum "
                              f"= {ctx.world_size} x {cfg.grad_accum}")
        self.micro_batch = cfg.data.batch_size // (ctx.world_size * cfg.grad_accum)
        if self.device.type == "cuda" and cfg.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.autocast = self.device.type == "cuda" and cfg.precision == "bf16"

        self.dataset = build_dataset(cfg.data.name, **cfg.data.options)
        self.vae = None
        if cfg.data.vae and not getattr(self.dataset, "is_latent", False):
            from ..data.extract import load_vae

            self.vae = load_vae(cfg.data.vae).to(self.device)
        self.data_info = _data_info(self.dataset, self.vae)
        if cfg.data.vae:
            self.data_info["vae"] = cfg.data.vae

        from ..models import create_model

        seed_everything(cfg.seed)  # identical initial weights on every rank
        model = create_model(cfg.model.name, **model_overrides(cfg, self.data_info))
        self.model_spec = dict(model.dtx_spec)
        self.ema = EMA(model, cfg.ema)
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(model)
        self.raw = model.to(self.device)
        self.ema.model.to(self.device)
        self.objective: Objective = build_objective(cfg.objective, model, self.data_info["image_size"])
        sampler_entry(cfg.sample.sampler, self.objective.kind)  # fail now, not after training, on a bad sampler
        self.optimizer = build_optimizer(model, cfg.optim)
        self.ckpts = CheckpointManager(self.out / "checkpoints", keep_last=cfg.keep_last,
                                       milestone_every=cfg.milestone_every or None)
        self.step = 0
        self.position = DataPosition()
        self.nonfinite_total = 0
        self.last_checkpoint: Path | None = None
        resume = ctx.resume_checkpoint()
        if resume is not None:
            self._restore(resume)
        self.model = ctx.prepare_model(self.raw)
        self.params = [p for p in self.raw.parameters() if p.requires_grad]

    # -- checkpoints --

    def _state(self) -> dict[str, Any]:
        from ..checkpoint import rng_state

        return {"model": self.raw.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step, "ema_updates": self.ema.updates, "rng": rng_state(),
                "data": {"epoch": self.position.epoch, "batch": self.position.batch},
                "nonfinite_total": self.nonfinite_total, "model_spec": self.model_spec,
                "data_info": self.data_info, "config": config_dict(self.cfg)}

    def _restore(self, path: Path) -> None:
        from ..checkpoint import load_checkpoint, set_rng_state
        from ..errors import CheckpointError
        from ..models import load_state_dict_strict

        state = load_checkpoint(path)
        saved_spec = state.get("model_spec")
        if saved_spec is not None and saved_spec != self.model_spec:
            raise CheckpointError(f"{path} was trained with model {saved_spec}, but this config builds "
                                  f"{self.model_spec}; use another --out or the original config")
        load_state_dict_strict(self.raw, state["model"], f"{path} (model)")
        self.ema.load_state_dict(state["ema"], int(state.get("ema_updates", state["step"])))
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{path}: optimizer state does not fit this model ({exc})") from exc
        self.step = int(state["step"])
        self.position = DataPosition(int(state["data"]["epoch"]), int(state["data"]["batch"]))
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        set_rng_state(state["rng"])
        self.last_checkpoint = path
        if self.ctx.is_main:
            log.info("resumed from %s at step %d", path, self.step)

    def save_checkpoint(self) -> Path | None:
        path = self.ckpts.save(self.step, self._state()) if self.ctx.is_main else None
        self.ctx.barrier()
        self.last_checkpoint = path or self.last_checkpoint
        return path

    # -- samples --

    def sample_grid(self) -> Path | None:
        """``samples/step_XXXXXXX.png`` from the EMA weights (main rank); latent runs need a VAE to decode."""
        if not self.ctx.is_main:
            return None
        info, s = self.data_info, self.cfg.sample
        if info["is_latent"] and self.vae is None:
            return None
        classes = default_classes(info["num_classes"], s.classes)
        k = s.n_per_class
        labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(k) if classes else None
        n = len(classes) * k if classes else max(k, 16)
        images = generate(self.ema.model, self.objective, (info["channels"], info["image_size"], info["image_size"]),
                          labels, n, sampler=s.sampler, steps=s.steps, cfg_scale=s.cfg, seed=SAMPLE_SEED,
                          guide_channels=s.guide_channels)
        if self.vae is not None:
            from .sample import decode_latents

            images = decode_latents(self.vae, images.to(self.device)).cpu()
        return save_grid(images, self.out / "samples" / f"step_{self.step:07d}.png",
                         nrow=k if classes else int(math.ceil(math.sqrt(n))))

    # -- one optimizer step --

    def _encode(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.vae is None:
            return x
        from ..data.extract import encode

        return encode(self.vae, x, sample_posterior=True, generator=gen)

    def train_step(self) -> tuple[float, float, bool]:
        """One optimizer step over ``grad_accum`` micro-batches: (mean loss, grad norm, finite)."""
        cfg = self.cfg
        step_seed = derive_seed(cfg.seed, STEP, self.ctx.rank, self.step)
        seed_everything(step_seed)
        gen = torch.Generator().manual_seed(step_seed ^ 0x5EED)
        set_lr(self.optimizer, lr_at(self.step, cfg.optim))
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            batch = self.stream.next()
            x = self._encode(batch["x"].to(self.device, non_blocking=True), gen)
            cond = {"y": batch["y"].to(self.device)} if "y" in batch else {}
            sync = micro == cfg.grad_accum - 1 or not hasattr(self.model, "no_sync")
            ctx_sync = self.model.no_sync() if not sync else contextlib.nullcontext()
            with ctx_sync, torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
                loss = self.objective.loss(self.model, x, cond, generator=gen).float().mean()
            (loss / cfg.grad_accum).backward()
            total += loss.detach() / cfg.grad_accum
        mean_loss = self.ctx.all_reduce_mean(total)
        norm = _grad_norm(self.params, cfg.optim.grad_clip)
        finite = bool(torch.isfinite(mean_loss)) and bool(torch.isfinite(norm))
        if finite:
            self.optimizer.step()
            self.ema.update(self.raw)
        self.optimizer.zero_grad(set_to_none=True)
        return float(mean_loss), float(norm), finite

    # -- the run --

    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        from ..preemption import stop_on_signals

        cfg, ctx = self.cfg, self.ctx
        self.stream = DataStream(self.dataset, cfg, ctx, self.micro_batch, self.position)
        if ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(to_yaml(cfg))
        metrics = MetricsLog(self.out / "metrics.jsonl", ctx.is_main)
        metrics.rewind(self.step)
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not ctx.is_main, desc="train", unit="step",
                   dynamic_ncols=True, mininterval=1.0)
        start_step, t0 = self.step, time.perf_counter()
        window_t, window_steps, window_loss, window_norm = t0, 0, 0.0, 0.0
        bad_streak, last_loss, stop_reason = 0, float("nan"), "max_steps"
        with stop_on_signals() as guard:
            while self.step < cfg.max_steps:
                loss, norm, finite = self.train_step()
                self.position = self.stream.pos
                if not finite:
                    self.nonfinite_total += 1
                    bad_streak += 1
                    metrics.write({"step": self.step, "event": "nonfinite", "loss": None, "streak": bad_streak})
                    if ctx.is_main:
                        log.warning("non-finite loss or gradient at step %d (%d in a row); step skipped",
                                    self.step + 1, bad_streak)
                    if bad_streak >= cfg.max_nonfinite:
                        bar.close()
                        keep = f"; last good checkpoint: {self.last_checkpoint}" if self.last_checkpoint else \
                            "; no checkpoint was written before it"
                        raise TrainingError(f"loss is not finite at step {self.step + 1} ({bad_streak} times in a "
                                            f"row); stopped{keep}")
                    continue
                bad_streak = 0
                self.step += 1
                window_steps += 1
                window_loss += loss
                window_norm += norm
                last_loss = loss
                bar.update(1)
                elapsed = time.perf_counter() - t0
                timed_out = cfg.max_minutes > 0 and elapsed >= cfg.max_minutes * 60
                stop = guard.stop_requested() or timed_out
                if ctx.world_size > 1:
                    stop = bool(ctx.all_reduce_mean(torch.tensor(float(stop), device=self.device)) > 0)
                last = self.step >= cfg.max_steps or stop
                if self.step % cfg.log_every == 0 or last:
                    now = time.perf_counter()
                    rate = window_steps / max(now - window_t, 1e-9)
                    record = {"step": self.step, "loss": window_loss / window_steps,
                              "lr": lr_at(self.step - 1, cfg.optim), "grad_norm": window_norm / window_steps,
                              "steps_per_s": rate, "samples_per_s": rate * cfg.data.batch_size,
                              "nonfinite_skipped": self.nonfinite_total, "time_s": elapsed}
                    metrics.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
                    ckpt = self.save_checkpoint() if (self.step % cfg.ckpt_every == 0 or last) else None
                    ctx.report(record, ckpt)
                    window_t, window_steps, window_loss, window_norm = now, 0, 0.0, 0.0
                elif self.step % cfg.ckpt_every == 0:
                    ctx.report({"step": self.step, "loss": loss}, self.save_checkpoint())
                if cfg.sample.every and self.step % cfg.sample.every == 0 and not last:
                    self.sample_grid()
                if stop:
                    stop_reason = "signal" if guard.stop_requested() else "max_minutes"
                    break
            bar.close()
            train_time = time.perf_counter() - t0
            grid = None
            if ctx.is_main and not guard.stop_requested():  # a preempted run exits at once: its checkpoint is saved
                grid = self.sample_grid()
                plot_loss(self.out / "metrics.jsonl", self.out / "loss.png")
            if guard.stop_requested():
                stop_reason = "signal"
        return {"step": self.step, "steps_run": self.step - start_step, "loss": last_loss, "train_time_s": train_time,
                "stopped_by": stop_reason, "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
                "samples": str(grid) if grid else None, "nonfinite_skipped": self.nonfinite_total,
                "out_dir": str(self.out)}


def train(cfg: TrainConfig, ctx: RunContext) -> dict[str, Any]:
    """Run (or resume) one worker's training; returns a summary (final step, loss, time, checkpoint, samples)."""
    return Trainer(cfg, ctx).run()
