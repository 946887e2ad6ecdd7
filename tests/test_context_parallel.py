"""Context parallelism across CPU processes over gloo: for DiT (Ulysses attention), Latte (each variant; frames
split, switched to positions for temporal attention) and GenTron (T2I Ulysses, T2V frames split around
TempSelfAttn), the loss and every parameter's gradient of one batch split across 2 (and 4) ranks equal the
single-process values to 1e-5 in float32."""

from __future__ import annotations

import pytest
import torch

from dtx.errors import ConfigError, ShapeError
from dtx.testing.context_parallel import context_parallel_runs

pytestmark = pytest.mark.slow

SMALL = {"input_size": 8, "depth": 2, "hidden_size": 32, "num_heads": 4}


def _batch(shape: tuple[int, ...], out_channels: int, seed: int = 1, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    target_shape = (*shape[:-3], out_channels, *shape[-2:])
    return {"x": x, "t": torch.tensor([10.0, 700.0]), **extra, "target": torch.randn(target_shape, generator=g)}


def _text(seed: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"context": torch.randn(2, 5, 16, generator=g), "pooled": torch.randn(2, 16, generator=g),
            "context_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()}


LABELS = {"y": torch.tensor([1, 3])}
LATTE = {**SMALL, "num_classes": 5, "num_frames": 4}
GENTRON = {**SMALL, "context_dim": 16, "text_length": 5}
CASES = [
    ("DiT", {**SMALL, "num_classes": 5}, _batch((2, 4, 8, 8), 8, **LABELS)),
    ("Latte", {**LATTE, "variant": 1}, _batch((2, 4, 4, 8, 8), 8, **LABELS)),
    ("Latte", {**LATTE, "variant": 2, "injection": "tokens"}, _batch((2, 4, 4, 8, 8), 8, **LABELS)),
    ("Latte", {**LATTE, "variant": 3, "patch_embed": "tubelet"}, _batch((2, 4, 4, 8, 8), 8, **LABELS)),
    ("Latte", {**LATTE, "variant": 4, "use_image_num": 2},  # 4 frames + 2 images (joint training), 6 split in 2
     _batch((2, 6, 4, 8, 8), 8, **LABELS, y_image=torch.tensor([[0, 2], [4, 1]]))),
    ("Latte", {**LATTE, "variant": 4, "spatial_pos": "rope", "temporal_pos": "rope"},
     _batch((2, 4, 4, 8, 8), 8, **LABELS)),
    ("GenTron", GENTRON, _batch((2, 4, 8, 8), 8, **_text())),
    ("GenTron", {**GENTRON, "num_frames": 4, "temporal_pos": "rope+sincos", "frame_embed": "tokens"},
     _batch((2, 4, 4, 8, 8), 8, **_text(), motion_free=torch.tensor([True, False]))),
]
IDS = ["dit", "latte-v1", "latte-v2-tokens", "latte-v3-tubelet", "latte-v4-images", "latte-v4-rope", "gentron-t2i",
       "gentron-t2v"]


def _assert_same(single: dict, split: dict) -> None:
    torch.testing.assert_close(split["loss"], single["loss"], rtol=0, atol=1e-5)
    assert split["grads"].keys() == single["grads"].keys() and len(single["grads"]) > 10
    for name, grad in single["grads"].items():
        assert grad.abs().max() > 0, name  # every parameter takes part
        torch.testing.assert_close(split["grads"][name], grad, rtol=0, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def two_ranks():
    return context_parallel_runs(CASES, world=2)


@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_two_ranks_give_the_single_process_loss_and_gradients(two_ranks, index):
    _assert_same(*two_ranks[index])


def test_four_ranks_give_the_single_process_loss_and_gradients():
    cases = [CASES[0], CASES[1], CASES[7]]  # 16 tokens and 4 frames split in four
    for single, split in context_parallel_runs(cases, world=4):
        _assert_same(single, split)


def test_what_cannot_be_split_is_refused_with_the_reason():
    import dtx
    from dtx.layers.context_parallel import ContextGroup, set_context_parallel

    class Two(ContextGroup):  # a group of two ranks, without a process group: only the checks run
        def __init__(self) -> None:
            self.group, self.size, self.rank = None, 2, 0

    with pytest.raises(ShapeError, match="num_heads divisible by 2"):
        set_context_parallel(dtx.create_model("DiT", **{**SMALL, "num_heads": 1}), Two())
    with pytest.raises(ShapeError, match="patch tokens of an image divisible by 2"):
        model = dtx.create_model("DiT", **{**SMALL, "input_size": 6})  # 9 tokens
        set_context_parallel(model, Two())
        model(torch.randn(1, 4, 6, 6), torch.tensor([1.0]), torch.tensor([0]))
    with pytest.raises(ConfigError, match="in-context"):
        set_context_parallel(dtx.create_model("DiT", **SMALL, block="in-context"), Two())
    with pytest.raises(ConfigError, match="parallel.context"):
        set_context_parallel(torch.nn.Linear(2, 2), Two())
    with pytest.raises(ConfigError, match="Latte-1"):
        set_context_parallel(dtx.create_model("PixArt", **SMALL, context_dim=16, text_length=4, num_frames=2), Two())


def test_bench_measures_one_ranks_share_of_the_activations():
    """``dtx bench --context-parallel N``: one rank's saved activations fall about N-fold (the token-wise ones split;
    the per-sample condition and the gathered output stay whole)."""
    from dtx.commands.bench import Setup, build_workload

    mib = {}
    for n in (1, 2, 4):
        setup = Setup(batch=2, input_size=16, precision="fp32", compile="off", context_parallel=n)
        mib[n] = build_workload("DiT", {**SMALL, "num_classes": 5}, setup, torch.device("cpu")).activation_mb()
    assert 0.45 < mib[2] / mib[1] < 0.6 and 0.2 < mib[4] / mib[1] < 0.35, mib
