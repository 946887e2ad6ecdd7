"""The training loop every backbone and runner shares: data -> (frozen VAE encode) -> conditioning stage (with
condition dropout) -> objective loss -> AdamW -> clipping -> EMA, with metrics, checkpoints, sample grids and
exact resume. No model family is named here: the model's declared interface, the registered objective and the
configured conditioners carry every difference.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import LATEST, RUN_CHECKPOINTS, load_checkpoint, rng_state, set_rng_state
from ..config import to_yaml
from ..cpu import cpu_info
from ..errors import CheckpointError, TrainingError
from ..io import atomic_write_text, refuse_link
from ..models import load_state_dict_strict
from ..preemption import stop_on_signals
from .checks import check_resume
from .config import TrainConfig, config_dict
from .compile import CompiledModel
from .context import RunContext
from .data_stream import DataPosition, DataStream
from .guards import check_update
from .lock import RunLock
from .metrics import MetricsLog, plot_loss
from .optim import lr_at, set_lr
from .sampling import SamplingSetup, generate, request_of, write_samples
from .run_parts import build_model, build_run
from .seeding import STEP, derive_seed, seed_everything
from .sharding import load_model_state, load_optimizer_state, model_state, optimizer_state

log = logging.getLogger(__name__)

SAMPLE_SEED = 0  # periodic grids always use the same noise, so they show progress rather than luck
#: what a run writes into its folder (besides the lock): none of it may be a symbolic link
RUN_ENTRIES = ("config.yaml", "metrics.jsonl", "loss.png", "samples", RUN_CHECKPOINTS, f"{RUN_CHECKPOINTS}/{LATEST}")


def _grad_norm(params: list[nn.Parameter], clip: float) -> torch.Tensor:
    grads = [p for p in params if p.grad is not None]
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(grads, clip)
    return torch.nn.utils.get_total_norm([p.grad for p in grads])  # type: ignore[misc]


def _finite_or_none(value: float) -> float | None:
    """``value``, or None where no step ran (NaN): the summary stays valid JSON."""
    return value if value == value else None


@dataclass
class Window:
    """Running sums between two log lines, and the newest step's batch loss."""

    t0: float
    steps: int = 0
    loss: float = 0.0
    norm: float = 0.0
    last: float = float("nan")

    def add(self, loss: float, norm: float) -> None:
        self.steps, self.loss, self.norm, self.last = self.steps + 1, self.loss + loss, self.norm + norm, loss


class Trainer:
    """State of one worker's run; ``train(cfg, ctx)`` builds it and calls ``run()``."""

    def __init__(self, cfg: TrainConfig, ctx: RunContext) -> None:
        self.cfg, self.ctx, self.out = cfg, ctx, Path(ctx.out_dir)
        parts = build_run(cfg, ctx)
        self.device, self.micro_batch, self.autocast, self.threads = (parts.device, parts.micro_batch,
                                                                      parts.autocast, parts.threads)
        self.data, self.info, self.data_classes, self.model_spec = (parts.data, parts.info, parts.data_classes,
                                                                    parts.model_spec)
        self.raw, self.model, self.ema, self.sharded = parts.raw, parts.model, parts.ema, parts.sharded
        self.stage, self.objective, self.optimizer, self.ckpts = (parts.stage, parts.objective, parts.optimizer,
                                                                  parts.ckpts)
        self.params, self.parallel, self.bucket_batches = parts.params, parts.parallel, parts.bucket_batches
        self.step, self.position, self.nonfinite_total = 0, DataPosition(), 0
        self.last_checkpoint: Path | None = None
        if parts.resume is not None:
            self._restore(parts.resume)

    # -- checkpoints --

    def _state(self) -> dict[str, Any]:
        """What a checkpoint holds; the conditioners are recorded by name and options, never their weights."""
        model = model_state(self.raw)
        if self.ema.keys is not None:  # a LoRA run: the adapters and what else trains; the base is finetune.from
            model = {k: v for k, v in model.items() if k in self.ema.keys}
        return {"model": model, "ema": self.ema.state_dict(),
                "optimizer": optimizer_state(self.raw, self.optimizer),
                "step": self.step, "ema_updates": self.ema.updates, "rng": rng_state(),
                "data": {"epoch": self.position.epoch, "batch": self.position.batch},
                "nonfinite_total": self.nonfinite_total, "model_spec": self.model_spec,
                "data_info": self.info.to_dict(), "data_classes": self.data_classes,
                "conditioners": self.stage.describe(),
                "config": config_dict(self.cfg)}

    def _restore(self, path: Path) -> None:
        state = load_checkpoint(path)
        saved_spec = state.get("model_spec")
        if saved_spec is not None and saved_spec != self.model_spec:
            raise CheckpointError(f"{path} was trained with model {saved_spec}, but this config builds "
                                  f"{self.model_spec}; use another --out or the original config")
        check_resume(state, path, self.cfg, self.info, self.data_classes)
        load_model_state(self.raw, state["model"], f"{path} (model)", keys=self.ema.keys)
        self.ema.load_state_dict(state["ema"], int(state.get("ema_updates", state["step"])))
        try:
            load_optimizer_state(self.raw, self.optimizer, state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: optimizer state does not fit this model ({exc})") from exc
        self.step = int(state["step"])
        self.position = DataPosition(int(state["data"]["epoch"]), int(state["data"]["batch"]))
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        set_rng_state(state["rng"])
        self.last_checkpoint = path
        if self.ctx.is_main:
            log.info("resumed from %s at step %d", path, self.step)

    def save_checkpoint(self) -> Path | None:
        state = self._state() if self.ctx.is_main or self.sharded else None  # sharded: every rank gathers
        path = self.ckpts.save(self.step, state) if self.ctx.is_main else None
        self.ctx.barrier()
        self.last_checkpoint = path or self.last_checkpoint
        return path

    # -- samples --

    def sample_grid(self) -> Path | None:
        """``samples/step_XXXXXXX.png`` (and .npz, videos) from the EMA weights through the one sampling path;
        call it on every rank (a sharded EMA is gathered first), rank 0 samples."""
        if self.info.is_latent and self.data.vae is None:
            return None
        ema = self._full_ema()
        if not self.ctx.is_main:
            return None
        s = self.cfg.sample
        setup = SamplingSetup(ema, self.objective, self.stage, self.info, self.cfg, str(self.out))
        samples = generate(setup, request_of(s), s, seed=SAMPLE_SEED, vae=self.data.vae)
        return Path(write_samples(samples, self.out / "samples" / f"step_{self.step:07d}.png", fps=s.fps)["grid"])

    def _full_ema(self) -> nn.Module:
        """The EMA model, or for a sharded run an unsharded copy on rank 0 (its full weights gathered from every
        rank; the other ranks get the sharded one back and do not sample)."""
        if not self.sharded:
            return self.ema.model
        state = self.ema.state_dict()
        if not self.ctx.is_main:
            return self.ema.model
        full = build_model(self.cfg, self.info)
        if self.ema.keys is None:
            load_state_dict_strict(full, state, "EMA weights")
        else:  # a LoRA run: the base from finetune.from, then the averaged adapters
            from ..finetune import prepare

            prepare(full, self.cfg.finetune)
            load_model_state(full, state, "EMA weights", keys=self.ema.keys)
        return full.to(self.device).eval().requires_grad_(False)

    # -- one optimizer step --

    def _encode(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.data.vae is None:
            return x
        from ..data.vae import encode

        return encode(self.data.vae, x, sample_posterior=True, generator=gen)

    def train_step(self) -> tuple[float, float, bool]:
        """One optimizer step over ``grad_accum`` micro-batches: (mean loss, grad norm, finite)."""
        cfg = self.cfg
        step_seed = derive_seed(cfg.seed, STEP, self.parallel.data_rank, self.step)  # a context group draws alike
        seed_everything(step_seed)
        gen = torch.Generator().manual_seed(step_seed ^ 0x5EED)
        set_lr(self.optimizer, lr_at(self.step, cfg.optim, cfg.max_steps))
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            batch = self.stream.next()
            x = self._encode(batch["x"].to(self.device, non_blocking=True), gen)
            cond = self.stage.training_kwargs(batch, self.device, gen)
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
            check_update(self.step + 1, self.raw, self.ema.model, self.last_checkpoint)
        self.optimizer.zero_grad(set_to_none=True)
        return float(mean_loss), float(norm), finite

    # -- the run --

    def _nonfinite(self, streak: int, metrics: MetricsLog) -> None:
        """Count a skipped step; stop with the step number after ``max_nonfinite`` in a row."""
        self.nonfinite_total += 1
        metrics.write({"step": self.step, "event": "nonfinite", "loss": None, "streak": streak})
        if self.ctx.is_main:
            log.warning("non-finite loss or gradient at step %d (%d in a row); step skipped", self.step + 1, streak)
        if streak >= self.cfg.max_nonfinite:
            keep = f"; last good checkpoint: {self.last_checkpoint}" if self.last_checkpoint else \
                "; no checkpoint was written before it"
            raise TrainingError(f"loss is not finite at step {self.step + 1} ({streak} times in a row); "
                                f"stopped{keep}")

    def _log(self, window: Window, elapsed: float, metrics: MetricsLog, save: bool) -> dict[str, Any]:
        cfg, now = self.cfg, time.perf_counter()
        rate = window.steps / max(now - window.t0, 1e-9)
        record = {"step": self.step, "loss": window.loss / window.steps, "batch_loss": window.last,
                  "lr": lr_at(self.step - 1, cfg.optim, cfg.max_steps), "grad_norm": window.norm / window.steps,
                  "steps_per_s": rate,
                  "samples_per_s": rate * cfg.data.batch_size, "nonfinite_skipped": self.nonfinite_total,
                  "time_s": elapsed}
        if self.threads is not None:
            record["threads"] = self.threads.threads
        metrics.write(record)
        self.ctx.report(record, self.save_checkpoint() if save else None)
        return record

    def _say(self, message: str) -> None:
        """One phase line on stderr from the main rank (what the run is doing while the bar cannot show it)."""
        if self.ctx.is_main:
            print(f"train: {message}", file=sys.stderr, flush=True)

    def _announce(self) -> None:
        """Say what runs where, and any time cap that could end the run before ``max_steps``."""
        cfg = self.cfg
        where = self.device.type
        if self.device.type == "cpu":
            threads = self.threads.threads if self.threads is not None else torch.get_num_threads()
            where = f"cpu ({cpu_info().describe()}, {threads} threads, {'bf16' if self.autocast else 'fp32'})"
        self._say(f"{cfg.model.name}, {sum(p.numel() for p in self.params) / 1e6:.2f}M trained parameters, steps "
                  f"{self.step} -> {cfg.max_steps}, batch {cfg.data.batch_size}, on {where}")
        if cfg.max_minutes > 0:
            self._say(f"time cap: max_minutes={cfg.max_minutes:g} stops the run early if it takes longer "
                      f"(a warning says so)")

    def _first_step(self) -> tuple[float, float, bool]:
        """The first step of this process, announced when it compiles the model (minutes on CPU)."""
        if not isinstance(self.model, CompiledModel):
            return self.train_step()
        self._say("compiling the model (first step" + ("; about a minute on CPU)" if self.device.type == "cpu" else ")"))
        start = time.perf_counter()
        out = self.train_step()
        how = "compiled" if self.model.eager_reason is None else "running eager"
        self._say(f"{how} in {time.perf_counter() - start:.0f} s")
        return out

    def _should_stop(self, guard: Any, elapsed: float) -> bool:
        cfg = self.cfg
        stop = guard.stop_requested() or (cfg.max_minutes > 0 and elapsed >= cfg.max_minutes * 60)
        if self.ctx.world_size > 1:
            stop = bool(self.ctx.all_reduce_mean(torch.tensor(float(stop), device=self.device)) > 0)
        return stop

    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg, ctx = self.cfg, self.ctx
        self.stream = DataStream(self.data.dataset, cfg, ctx, self.micro_batch, self.position,
                                 self.parallel.data_rank, self.parallel.data_world, self.bucket_batches)
        metrics = MetricsLog(self.out / "metrics.jsonl", ctx.is_main)
        metrics.rewind(self.step)  # first: a malformed metrics.jsonl stops the run before config.yaml is written
        if ctx.is_main:
            atomic_write_text(self.out / "config.yaml", to_yaml(cfg))
        self._announce()
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not ctx.is_main, desc="train", unit="step",
                   dynamic_ncols=True, mininterval=1.0)
        start_step, t0 = self.step, time.perf_counter()
        window, streak, last_loss, stopped_by = Window(t0), 0, float("nan"), "max_steps"
        logged_loss = float("nan")  # the newest metrics line's loss (mean since the line before), as the bar shows
        with stop_on_signals() as guard:
            try:
                while self.step < cfg.max_steps:
                    loss, norm, finite = self._first_step() if self.step == start_step else self.train_step()
                    if self.threads is not None:
                        self.threads.update()
                    self.position = self.stream.pos
                    if not finite:
                        streak += 1
                        self._nonfinite(streak, metrics)
                        continue
                    streak, last_loss = 0, loss
                    self.step += 1
                    window.add(loss, norm)
                    bar.update(1)
                    stop = self._should_stop(guard, time.perf_counter() - t0)
                    last = self.step >= cfg.max_steps or stop
                    if self.step % cfg.log_every == 0 or last:
                        record = self._log(window, time.perf_counter() - t0, metrics,
                                           save=self.step % cfg.ckpt_every == 0 or last)
                        bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
                        logged_loss = record["loss"]
                        window = Window(time.perf_counter())
                    elif self.step % cfg.ckpt_every == 0:
                        ctx.report({"step": self.step, "batch_loss": loss}, self.save_checkpoint())
                    if cfg.sample.every and self.step % cfg.sample.every == 0 and not last:
                        self.sample_grid()
                    if stop:
                        stopped_by = "signal" if guard.stop_requested() else "max_minutes"
                        break
            finally:
                bar.close()
            if stopped_by == "max_minutes" and ctx.is_main and self.step < cfg.max_steps:
                log.warning("time cap max_minutes=%g ended the run at step %d of max_steps=%d",
                            cfg.max_minutes, self.step, cfg.max_steps)
            train_time = time.perf_counter() - t0
            grid = None
            if not guard.stop_requested():  # a preempted run exits at once: its checkpoint is saved
                grid = self.sample_grid()
                if ctx.is_main:
                    plot_loss(self.out / "metrics.jsonl", self.out / "loss.png")
            if guard.stop_requested():
                stopped_by = "signal"
        return {"step": self.step, "steps_run": self.step - start_step, "loss": _finite_or_none(logged_loss),
                "batch_loss": _finite_or_none(last_loss), "train_time_s": train_time,
                "stopped_by": stopped_by, "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
                "samples": str(grid) if grid else None, "nonfinite_skipped": self.nonfinite_total,
                "out_dir": str(self.out)}


def train(cfg: TrainConfig, ctx: RunContext) -> dict[str, Any]:
    """Run (or resume) one worker's training; returns a summary (final step, loss, time, checkpoint, samples)."""
    with RunLock(ctx.out_dir, enabled=ctx.is_main):  # one writer per run folder, for the whole run
        if ctx.is_main:  # before anything is read or written: a run folder from elsewhere may hold links
            for name in RUN_ENTRIES:
                refuse_link(Path(ctx.out_dir) / name)
        return Trainer(cfg, ctx).run()
