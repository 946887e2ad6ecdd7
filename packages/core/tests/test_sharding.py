"""FSDP2 helpers of the training loop: shard units, full state dicts in and out of sharded modules (two gloo
processes on CPU), optimizer states in either layout, and the non-finite guard agreeing across ranks."""

from __future__ import annotations

import copy
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dtx.training.guards import nonfinite_parameters
from dtx.training.sharding import (is_sharded, load_model_state, load_optimizer_state, model_state, optimizer_state,
                                   shard_like, shard_model, shard_units)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(2)])
        self.head = nn.Linear(8, 1)  # a 1-row weight: one rank's shard is empty

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _adam_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 2) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 6, generator=gen)).square().mean().backward()
        opt.step()


def test_shard_units_are_the_blocks_of_the_outermost_module_lists():
    assert shard_units(Tiny()) == ["blocks.0", "blocks.1"]


def test_a_numbered_optimizer_state_loads_by_name_into_the_same_parameters():
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.AdamW([{"params": list(model.blocks.parameters())},
                             {"params": [*model.embed.parameters(), *model.head.parameters()], "lr": 1e-2}])
    _adam_steps(model, opt)
    saved = copy.deepcopy(optimizer_state(model, opt))
    assert all(isinstance(k, int) for k in saved["state"])  # unsharded: torch's own layout
    from dtx.training.sharding import _by_name

    named = _by_name(model, opt, saved)
    assert set(named["state"]) == {n for n, _ in model.named_parameters()}
    fresh = torch.optim.AdamW([{"params": list(model.blocks.parameters())},
                               {"params": [*model.embed.parameters(), *model.head.parameters()], "lr": 1e-2}])
    load_optimizer_state(model, fresh, named)
    for i, p in enumerate(p for g in fresh.param_groups for p in g["params"]):
        assert torch.equal(fresh.state[p]["exp_avg"], saved["state"][i]["exp_avg"])
    assert [g["lr"] for g in fresh.param_groups] == [g["lr"] for g in saved["param_groups"]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = Tiny()
        full = copy.deepcopy(model.state_dict())
        ema = copy.deepcopy(model).requires_grad_(False)
        shard_model(model)
        shard_like(ema, model)
        assert is_sharded(model) and is_sharded(ema)
        assert model.head.weight.to_local().numel() in (0, 8)  # 1 x 8 split over 2 ranks by rows
        gathered = model_state(model)
        if rank == 0:  # the full tensors, equal to the unsharded model's
            assert gathered.keys() == full.keys()
            assert all(torch.equal(gathered[k], full[k]) for k in full)
        else:
            assert gathered == {}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        _adam_steps(model, opt)
        trained, moments = model_state(model), optimizer_state(model, opt)
        load_model_state(ema, {k: torch.full_like(v, 0.5) for k, v in full.items()}, "test")
        local = ema.blocks[0][0].weight.to_local()
        assert torch.all(local == 0.5)
        with torch.no_grad():  # a NaN in rank 1's shard only: both ranks must see it
            if rank == 1:
                ema.blocks[1][0].weight.to_local().view(-1)[0] = float("nan")
        assert nonfinite_parameters(ema) == ["blocks.1.0.weight"]
        if rank == 0:
            torch.save({"model": trained, "optimizer": moments}, out)
        dist.barrier()  # neither rank tears gloo down while the other still talks to it (an intermittent SIGABRT)
    finally:
        dist.destroy_process_group()


def test_sharded_state_gathers_to_full_tensors_and_restores_shards(tmp_path):
    out = tmp_path / "state.pt"
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=2)
    saved = torch.load(out)
    torch.manual_seed(0)
    reference = Tiny()
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    _adam_steps(reference, opt)  # the same data on both ranks: sharded training equals one process's
    for k, v in reference.state_dict().items():
        assert torch.allclose(saved["model"][k], v, atol=1e-6), k
    names = [n for n, _ in reference.named_parameters()]
    assert set(saved["optimizer"]["state"]) == set(names)
    for i, name in enumerate(names):
        assert torch.allclose(saved["optimizer"]["state"][name]["exp_avg"], opt.state_dict()["state"][i]["exp_avg"],
                              atol=1e-6), name
    # and the full, named state restores into an unsharded model for sampling or single-process resume
    plain = Tiny()
    load_model_state(plain, saved["model"], "test")
    fresh = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    load_optimizer_state(plain, fresh, saved["optimizer"])
    assert torch.allclose(fresh.state[plain.head.weight]["exp_avg_sq"], opt.state[reference.head.weight]["exp_avg_sq"],
                          atol=1e-9)
