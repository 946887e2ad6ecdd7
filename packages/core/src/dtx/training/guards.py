"""The non-finite update guard: after every optimizer and EMA update, the trained parameters and the EMA
parameters must be finite. A finite loss can still produce an update that overflows (an absurd learning rate, a
huge gradient with clipping off); such weights must never be saved, so the run stops at that step, naming the last
checkpoint, which :class:`~dtx.checkpoint.CheckpointManager` guarantees is finite."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import TrainingError
from .sharding import is_sharded


def nonfinite_parameters(model: nn.Module) -> list[str]:
    """Names of floating-point parameters holding NaN or inf: one norm per tensor, one host sync. For a
    sharded model each rank checks its shards and the flags are combined, so every rank returns the same names."""
    named = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    if not named:
        return []
    local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for _, p in named]
    filled = [i for i, t in enumerate(local) if t.numel()]  # a shard can be empty (fewer rows than ranks)
    flags = torch.zeros(len(named), device=local[0].device)
    if filled:
        # screen with 2-norms (10x cheaper than max-norms on CPU; NaN and inf propagate), then confirm the few
        # flagged tensors exactly, since finite values beyond ~1e19 also overflow a 2-norm
        norms = torch._foreach_norm([local[i] for i in filled], 2)
        suspect = (~torch.isfinite(torch.stack([n.float() for n in norms]))).nonzero().flatten().tolist()
        for j in suspect:
            flags[filled[j]] = float(not bool(torch.isfinite(local[filled[j]]).all()))
    if is_sharded(model):
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return [n for (n, _), bad in zip(named, flags.cpu().tolist()) if bad]


def check_update(step: int, model: nn.Module, ema: nn.Module, last_checkpoint: Path | None) -> None:
    """Raise ``TrainingError`` when the update of ``step`` (1-based) left non-finite parameters or EMA values."""
    bad = {"parameters": nonfinite_parameters(model), "EMA": nonfinite_parameters(ema)}
    if not any(bad.values()):
        return
    where = "; ".join(f"{what}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                      for what, names in bad.items() if names)
    keep = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was written before it"
    raise TrainingError(f"the update of step {step} made weights non-finite although its loss was finite ({where}); "
                        f"stopped before saving them; {keep} (lower optim.lr or set optim.grad_clip)")
