"""CPU benchmark: dtx's DiT against a straightforward reference of the paper's model built from timm-style blocks.

Three measurements per configuration: ``fwd`` (no grad), ``fwdbwd`` (forward, loss, backward) and ``step`` (the whole
optimizer step: ``fwdbwd``, then DiT train.py's AdamW and EMA update for the reference, dtx's trainer update for dtx:
gradient norm, AdamW from ``build_optimizer``, EMA, non-finite guard).

timm cannot be imported here (its layers import torchvision, which this environment does not install), so the
reference writes timm's ``Attention`` (fused SDPA path) and ``Mlp`` out as timm does and assembles them as DiT's
models.py does, with ``nn.Linear`` (PyTorch's CPU float32 dispatch: MKL). Both models share one state dict (their key
names are the same); the script checks that their outputs agree, then times the measurements alternately in one
process and prints one JSON line per configuration with medians and dtx/reference ratios (< 1 means dtx is faster), by
wall clock and by process CPU time (``cpu_``), which is steadier when other jobs share the machine. ``--linear aten``
runs dtx's Linear on PyTorch's dispatch too (the ablation of ``dtx.layers.linear``'s oneDNN path).

    python packages/backbone-dit/benchmarks/bench_dit.py [--models DiT-S/2 DiT-B/4] [--batch 8] [--repeats 7]
    python packages/backbone-dit/benchmarks/bench_dit.py --models DiT-S/2 --compile   # + dtx under torch.compile
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import dtx


# -- reference: timm's Attention / Mlp and DiT's models.py, written plainly ----------------------------------------

class TimmAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class TimmMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def ref_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class RefTimestepEmbedder(nn.Module):
    def __init__(self, dim: int, freq: int = 256) -> None:
        super().__init__()
        self.freq = freq
        self.mlp = nn.Sequential(nn.Linear(freq, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class RefLabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, dim: int, p: float) -> None:
        super().__init__()
        self.num_classes, self.p = num_classes, p
        self.embedding_table = nn.Embedding(num_classes + int(p > 0), dim)

    def forward(self, y: torch.Tensor, train: bool) -> torch.Tensor:
        if train and self.p > 0:
            y = torch.where(torch.rand(y.shape[0], device=y.device) < self.p, self.num_classes, y)
        return self.embedding_table(y)


class RefBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = TimmAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = TimmMlp(dim, 4 * dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(ref_modulate(self.norm1(x), sh1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(ref_modulate(self.norm2(x), sh2, sc2))


class RefFinal(nn.Module):
    def __init__(self, dim: int, p: int, out: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, p * p * out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(ref_modulate(self.norm_final(x), shift, scale))


class PatchConv(nn.Module):
    def __init__(self, p: int, c: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(c, dim, p, p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class RefDiT(nn.Module):
    def __init__(self, input_size: int, patch: int, dim: int, depth: int, heads: int, classes: int = 1000) -> None:
        super().__init__()
        self.p, self.out = patch, 8
        self.x_embedder = PatchConv(patch, 4, dim)
        self.t_embedder = RefTimestepEmbedder(dim)
        self.y_embedder = RefLabelEmbedder(classes, dim, 0.1)
        self.pos_embed = nn.Parameter(torch.zeros(1, (input_size // patch) ** 2, dim), requires_grad=False)
        self.blocks = nn.ModuleList(RefBlock(dim, heads) for _ in range(depth))
        self.final_layer = RefFinal(dim, patch, self.out)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, self.p, self.p, self.out)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], self.out, h * self.p, w * self.p)


# -- timing --------------------------------------------------------------------------------------------------------

def _forward(model: nn.Module, x, t, y) -> None:
    model.eval()
    with torch.no_grad():
        model(x, t, y)


def _train_step(model: nn.Module, x, t, y) -> None:
    model.train()
    model.zero_grad(set_to_none=True)
    model(x, t, y).square().mean().backward()


class RefUpdate:
    """The rest of DiT's train.py step: ``AdamW(lr=1e-4, weight_decay=0)`` with PyTorch's defaults (a per-tensor
    loop on CPU) and ``update_ema``'s per-parameter ``mul_(decay).add_(param, alpha=1 - decay)``."""

    def __init__(self, model: nn.Module) -> None:
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
        self.pairs = [(e, p) for e, p in zip(copy.deepcopy(model).requires_grad_(False).parameters(),
                                             model.parameters())]

    def __call__(self, model: nn.Module) -> None:
        self.opt.step()
        with torch.no_grad():
            for e, p in self.pairs:
                e.mul_(0.9999).add_(p.data, alpha=1 - 0.9999)


class DtxUpdate:
    """The rest of dtx's ``Trainer.train_step``: gradient norm, ``build_optimizer``'s AdamW, the EMA and the
    non-finite update guard, as the trainer calls them."""

    def __init__(self, model: nn.Module) -> None:
        from dtx.training.config import EMAConfig, OptimConfig
        from dtx.training.ema import EMA
        from dtx.training.optim import build_optimizer

        self.opt = build_optimizer(model, OptimConfig(lr=1e-4, weight_decay=0.0))
        self.ema = EMA(model, EMAConfig())

    def __call__(self, model: nn.Module) -> None:
        from dtx.training.guards import check_update

        torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        self.opt.step()
        self.ema.update(model)
        check_update(1, model, self.ema.model, None)


def _full_step(model: nn.Module, update, x, t, y) -> None:
    _train_step(model, x, t, y)
    update(model)


def bench(name: str, batch: int, repeats: int, size: int = 32, compiled: bool = False, eager: bool = True,
          precision: str = "fp32") -> dict:
    """One JSON row: dtx (eager, and compiled when asked) against the reference, timed interleaved round by round
    (``dtx.benchmarking.interleaved``); ratios are medians of per-round ratios (< 1: dtx is faster). With
    ``precision="bf16"`` dtx runs under CPU bf16 autocast while the reference stays fp32 (as the official code)."""
    from dtx.benchmarking import interleaved, round_ratio
    from dtx.training.compile import compile_model

    torch.manual_seed(0)
    ours = dtx.create_model(name, input_size=size, num_classes=1000)
    cfg = ours.config
    with torch.no_grad():  # random weights everywhere, so no branch is the zero-init identity
        for p in ours.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    ref = RefDiT(size, cfg.patch_size, cfg.hidden_size, cfg.depth, cfg.num_heads)
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(batch, 4, size, size)
    t = torch.randint(0, 1000, (batch,))
    y = torch.randint(0, 1000, (batch,))
    ours.eval(), ref.eval()
    with torch.no_grad():
        diff = (ours(x, t, y) - ref(x, t, y)).abs().max().item()
    models = {"dtx": ours, "ref": ref} if eager else {"ref": ref}
    row = {"bench": "dit-cpu", "model": name, "batch": batch, "latent": [4, size, size], "dtx_precision": precision,
           "threads": torch.get_num_threads(), "repeats": repeats, "max_abs_diff": diff}
    if compiled:
        twin = dtx.create_model(name, input_size=size, num_classes=1000)
        twin.load_state_dict(ours.state_dict())
        runner, reason = compile_model(twin, "on", "cpu")
        if reason is None:
            models["dtxc"] = runner
            t0 = time.perf_counter()
            with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
                _forward(runner, x, t, y), _train_step(runner, x, t, y)  # compiles both graphs
            row["compile_s"] = round(time.perf_counter() - t0, 1)
        else:
            row["compile_skipped"] = reason
    def call(n: str, step) -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16" and n != "ref"):
            step(models[n], x, t, y)

    updates = {n: (RefUpdate if n == "ref" else DtxUpdate)(getattr(m, "eager", m)) for n, m in models.items()}

    def full_step(model: nn.Module, x, t, y) -> None:
        name = next(n for n, m in models.items() if m is model)
        _full_step(model, updates[name], x, t, y)

    for k, step in (("fwd", _forward), ("fwdbwd", _train_step), ("step", full_step)):
        names = list(models)
        times = dict(zip(names, interleaved([lambda n=n, s=step: call(n, s) for n in names],
                                            lambda: None, warmup=1, repeats=repeats)))
        for clock, i in (("", 0), ("cpu_", 1)):
            ref_t = [v[i] for v in times["ref"]]
            row[f"ref_{k}_{clock}ms"] = round(statistics.median(ref_t), 1)
            for n in names:
                if n == "ref":
                    continue
                ours_t = [v[i] for v in times[n]]
                row[f"{n}_{k}_{clock}ms"] = round(statistics.median(ours_t), 1)
                # per-round ratios cancel load changes that hit both models in the same round
                prefix = "" if n == "dtx" else "compiled_"
                row[f"{prefix}{k}_{clock}ratio"] = round(round_ratio(ours_t, ref_t), 3)
    if "dtxc" in models and getattr(models["dtxc"], "eager_reason", None):
        row["compile_fell_back"] = models["dtxc"].eager_reason
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["DiT-S/2", "DiT-B/4"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="also time dtx under torch.compile (compiled_* keys)")
    parser.add_argument("--no-eager", action="store_true",
                        help="with --compile: time only compiled dtx and the reference")
    parser.add_argument("--linear", choices=("auto", "aten"), default="auto",
                        help="dtx's Linear backend (dtx.layers.linear); the reference always uses nn.Linear")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="dtx's precision (bf16: CPU autocast); the reference always runs fp32")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from dtx.layers import use_linear_backend

    for name in args.models:
        with use_linear_backend(args.linear):
            row = bench(name, args.batch, args.repeats, compiled=args.compile, eager=not args.no_eager,
                        precision=args.precision)
        print(json.dumps({**row, "dtx_linear": args.linear}), flush=True)


if __name__ == "__main__":
    main()
