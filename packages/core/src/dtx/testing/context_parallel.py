"""Context-parallel checks for a family's tests: the same model, batch and loss run in one process and split across
N CPU processes over gloo (``torch.distributed`` with ``env://`` rendezvous, as the Ray runner's workers start), and
the loss and every parameter's gradient compared.

``context_parallel_runs([(name, options, inputs), ...], world)`` builds each ``dtx.create_model(name, **options)``
in the parent, gives it random weights, and returns ``(single, split)`` per case: each a dict with ``loss`` and
``grads`` (name -> tensor; the split run's averaged over the ranks, as data-parallel training averages them).
The loss is the mean squared error of the output against ``inputs['target']``.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _loss_and_grads(model: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """Mean squared error of the model's output against ``inputs['target']``, and its gradients."""
    model.zero_grad(set_to_none=True)
    kwargs = {k: v for k, v in inputs.items() if k not in ("x", "t", "target")}
    out = model(inputs["x"], inputs["t"], **kwargs)
    loss = (out - inputs["target"]).square().mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": loss.detach(), "grads": grads}


def _worker(rank: int, world: int, port: int, job: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
    try:
        import dtx
        from dtx.layers.context_parallel import ContextGroup, set_context_parallel

        results = []
        for case in torch.load(job, weights_only=False):
            model = dtx.create_model(case["name"], **case["options"])
            model.load_state_dict(case["state"])
            set_context_parallel(model, ContextGroup())
            result = _loss_and_grads(model, case["inputs"])
            for g in result["grads"].values():
                dist.all_reduce(g)
                g /= world
            results.append(result)
        if rank == 0:
            torch.save(results, job + ".out")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def context_parallel_runs(cases: list[tuple[str, dict[str, Any], dict[str, Any]]], world: int = 2,
                          seed: int = 0) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """For each (model name, options, inputs): (one process, ``world`` context-parallel processes), each a dict of
    ``loss`` and ``grads``; one set of worker processes runs every case."""
    import dtx

    jobs, singles = [], []
    for name, options, inputs in cases:
        torch.manual_seed(seed)
        model = dtx.create_model(name, **options)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        singles.append(_loss_and_grads(model, inputs))
        jobs.append({"name": name, "options": options, "state": model.state_dict(), "inputs": inputs})
    with tempfile.TemporaryDirectory() as tmp:
        job = str(Path(tmp) / "job.pt")
        torch.save(jobs, job)
        mp.start_processes(_worker, args=(world, _free_port(), job), nprocs=world, start_method="spawn")
        splits = torch.load(job + ".out", weights_only=False)
    return list(zip(singles, splits))
