"""``moving-digits`` (dtx_latte.data.MovingDigits) and the joint-training image-label conditioner.

The clips are checked against the image digits they are made of: same split, the 2x-upscaled sprite pasted at the
recorded positions on a -1 canvas, bounces that keep the whole digit inside for 16 frames, motion fixed by
(seed, index), never-zero velocities, and the still frames of joint training. The shipped digits classifier scores
real clips as consistent and moving (``dtx.evaluation.digits.frame_consistency``).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from dtx.conditioning import ConditioningStage, Member, SampleRequest
from dtx.data.digits import DigitsDataset, digits_arrays
from dtx.errors import ConfigError, ShapeError
from dtx.evaluation.digits import frame_consistency
from dtx_latte.conditioning import ImageLabelConditioner
from dtx_latte.data import CANVAS, MAX_POS, SPRITE, MovingDigits


@pytest.fixture(scope="module")
def test16():
    return MovingDigits("test", frames=16)


def test_shapes_info_and_values():
    d = MovingDigits("test")
    item = d[0]
    assert set(item) == {"x", "y"}
    assert item["x"].shape == (8, 1, 32, 32) and item["x"].dtype == torch.float32
    assert item["y"].dtype == torch.int64 and item["y"].ndim == 0
    info = d.info
    assert (info.channels, info.height, info.width, info.frames, info.num_classes) == (1, 32, 32, 8, 10)
    assert info.fields == ("y",) and info.sample_shape == (8, 1, 32, 32) and not info.is_latent
    sprites, labels = digits_arrays("test", 16)
    for i in (0, 7, len(d) - 1):
        x = d[i]["x"]
        assert x.min() >= -1 and x.max() <= 1
        assert d[i]["y"] == labels[i]
        for f, (r, c) in enumerate(d.positions(i)):
            assert torch.equal(x[f, :, r:r + SPRITE, c:c + SPRITE], sprites[i])  # the 2x digit itself
            background = x[f].clone()
            background[:, r:r + SPRITE, c:c + SPRITE] = -1
            assert torch.all(background == -1)  # black everywhere else


def test_bounces_keep_the_whole_digit_inside_for_16_frames(test16):
    sprites, _ = digits_arrays("test", 16)
    bounced = 0
    for i in range(len(test16)):
        x = test16[i]["x"]
        assert x.shape[0] == 16
        # nothing is cut off: every frame holds the sprite's full brightness
        assert torch.allclose((x + 1).sum(dim=(1, 2, 3)), (sprites[i] + 1).sum().expand(16))
        (r, c), (vr, vc) = test16.motion(i)
        pos = test16.positions(i)
        assert pos[0] == (r, c)
        for (r0, c0), (r1, c1) in zip(pos, pos[1:]):
            assert 0 <= r1 <= MAX_POS and 0 <= c1 <= MAX_POS
            for p0, p1, v, axis in ((r0, r1, vr, 0), (c0, c1, vc, 1)):
                step = p0 + v
                if 0 <= step <= MAX_POS:
                    assert p1 == step
                else:  # mirrored at the border, velocity reversed
                    assert p1 == (-step if step < 0 else 2 * MAX_POS - step)
                    bounced += 1
                    if axis == 0:
                        vr = -vr
                    else:
                        vc = -vc
    assert bounced > len(test16)  # 16 frames at up to 3 px/frame in a 16 px range: most clips bounce


def test_motion_is_deterministic_per_index_and_seed():
    a, b = MovingDigits("train", seed=3), MovingDigits("train", seed=3)
    order = [5, 0, 1441, 17]
    first = {i: a[i]["x"] for i in order}
    for i in reversed(order):  # another instance, another order of access
        assert torch.equal(b[i]["x"], first[i])
    assert torch.equal(a[-1]["x"], a[len(a) - 1]["x"])
    other = MovingDigits("train", seed=4)
    differ = sum(a.motion(i) != other.motion(i) for i in range(100))
    assert differ >= 90
    with pytest.raises(IndexError):
        a[len(a)]


def test_split_sizes_and_labels_match_the_image_digits():
    total = 0
    for split in ("train", "test", "all"):
        clips, images = MovingDigits(split), DigitsDataset(image_size=16, split=split)
        assert len(clips) == len(images)
        assert torch.equal(clips.labels, images.labels)
        total += len(clips) if split != "all" else 0
    assert total == len(MovingDigits("all")) == 1797
    assert len(MovingDigits("test")) == 355


def test_velocity_is_never_zero():
    d = MovingDigits("all")
    seen = set()
    for i in range(len(d)):
        (r, c), v = d.motion(i)
        assert v != (0, 0) and max(abs(v[0]), abs(v[1])) <= 3
        assert 0 <= r <= MAX_POS and 0 <= c <= MAX_POS
        seen.add(v)
    assert len(seen) == 48  # every nonzero pair of -3..3 occurs
    x = torch.stack([d[i]["x"][:2] for i in range(0, len(d), 7)])
    assert not any(torch.equal(clip[0], clip[1]) for clip in x)  # every clip moves from frame 0 to frame 1


def test_joint_training_items_carry_stills_and_their_labels():
    d = MovingDigits("test", frames=6, seed=1, use_image_num=3)
    assert d.info.frames == 6 and d.info.fields == ("y", "y_image")
    plain = MovingDigits("test", frames=6, seed=1)
    for i in (0, 11, len(d) - 1):
        item = d[i]
        assert item["x"].shape == (9, 1, CANVAS, CANVAS)
        assert torch.equal(item["x"][:6], plain[i]["x"])  # the clip itself is unchanged
        assert item["y_image"].shape == (3,) and item["y_image"].dtype == torch.int64
        sources = d.image_sources(i)
        assert len(sources) == 3 and all(c != i for c, _ in sources)
        for k, (c, f) in enumerate(sources):
            assert 0 <= f < 6
            assert torch.equal(item["x"][6 + k], plain[c]["x"][f])  # a still frame of another clip
            assert item["y_image"][k] == d.labels[c]
        assert torch.equal(d[i]["x"], item["x"])  # seeded per item
    batch = next(iter(DataLoader(d, batch_size=4)))
    assert batch["x"].shape == (4, 9, 1, 32, 32) and batch["y"].shape == (4,) and batch["y_image"].shape == (4, 3)
    # different items draw different stills
    assert len({tuple(d.image_sources(i)) for i in range(20)}) == 20


@pytest.mark.parametrize("frames", [3, 17, 0, 8.0, "8", True])
def test_bad_frames_is_a_config_error_naming_frames(frames):
    with pytest.raises(ConfigError, match="frames"):
        MovingDigits("test", frames=frames)


def test_other_bad_options():
    for frames in (4, 16):
        assert MovingDigits("test", frames=frames)[0]["x"].shape[0] == frames
    with pytest.raises(ConfigError, match="use_image_num"):
        MovingDigits("test", use_image_num=-1)
    with pytest.raises(ConfigError, match="split"):
        MovingDigits("valid")
    with pytest.raises(ConfigError, match="seed"):
        MovingDigits("test", seed=1.5)


def test_real_clips_score_consistent_and_moving(test16):
    clips = torch.stack([test16[i]["x"] for i in range(len(test16))])
    labels = test16.labels
    real = frame_consistency(clips, labels)
    assert real["num_videos"] == 355 and real["frames"] == 16
    assert real["frame_consistency"] >= 0.95 and real["clip_consistency"] >= 0.95
    assert real["moving"] == 1.0 and real["mean_displacement_px"] > 5
    frozen = frame_consistency(clips[:, :1].expand(-1, 16, -1, -1, -1), labels)
    assert frozen["moving"] == 0.0 and frozen["mean_displacement_px"] == 0.0
    assert frozen["frame_consistency"] >= 0.95
    wrong = frame_consistency(clips, (labels + 1) % 10)
    assert wrong["frame_consistency"] < 0.1 and wrong["moving"] == 1.0


# -- ImageLabelConditioner --------------------------------------------------------------------------------------

class _Config:
    use_image_num = 3


class _Model(torch.nn.Module):
    num_classes = 10
    null_class = 10
    config = _Config()


def test_image_label_conditioner_contract():
    info = MovingDigits("test", use_image_num=3).info
    cond = ImageLabelConditioner()
    cond.bind(_Model(), info)
    assert cond.fields == ("y_image",) and cond.use_image_num == 3 and cond.null_class == 10
    assert cond.has_null and cond.default_dropout == 0.1
    out = cond.encode({"y_image": torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.int32)}, torch.device("cpu"))
    assert out["y_image"].dtype == torch.long and out["y_image"].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert torch.equal(cond.null_fields(2)["y_image"], torch.full((2, 3), 10))
    # sampling: clips without images, so no image labels reach the model
    assert cond.subjects(SampleRequest(classes=[3, 7])) is None
    for fields in (cond.default_fields(4), cond.guidance_null(SampleRequest(), 4)):
        assert fields["y_image"].shape == (4, 0)
        assert cond.encode(fields, torch.device("cpu")) == {}
    with pytest.raises(ShapeError):
        cond.encode({"y_image": torch.tensor([1, 2])}, torch.device("cpu"))
    with pytest.raises(ShapeError):
        cond.encode({"y_image": torch.zeros(2, 3)}, torch.device("cpu"))
    with pytest.raises(ShapeError, match="use_image_num=3"):
        cond.encode({"y_image": torch.zeros(2, 2, dtype=torch.long)}, torch.device("cpu"))


def test_image_label_conditioner_reads_k_from_the_attribute_and_without_a_null_class():
    model = torch.nn.Module()
    model.use_image_num = 2
    cond = ImageLabelConditioner()
    cond.bind(model, MovingDigits("test").info)
    assert cond.use_image_num == 2 and cond.null_class is None and cond.num_classes == 10
    assert not cond.has_null and cond.default_dropout == 0.0
    with pytest.raises(ConfigError, match="null class"):
        cond.null_fields(1)


def test_image_labels_in_a_conditioning_stage():
    cond = ImageLabelConditioner()
    cond.bind(_Model(), MovingDigits("test", use_image_num=3).info)
    stage = ConditioningStage([Member("y_image", "image-labels", cond, 0.5, {})])
    batch = next(iter(DataLoader(MovingDigits("test", use_image_num=3), batch_size=64)))
    kwargs = stage.training_kwargs(batch, torch.device("cpu"), torch.Generator().manual_seed(0))
    y = kwargs["y_image"]
    dropped = (y == 10).all(dim=1)
    assert y.shape == (64, 3) and 10 < int(dropped.sum()) < 54  # whole rows dropped, about half of them
    assert torch.equal(y[~dropped], batch["y_image"][~dropped])
    raw, n = stage.request_fields(SampleRequest(classes=[1, 2]), per_subject=2)
    assert n == 2 and raw["y_image"].shape == (2, 0)  # no subjects of its own: the other conditioners count


def test_joint_training_batches_and_sampling_through_a_tiny_latte():
    """A joint-training batch trains a tiny Latte with y and y_image; sampling-time conditions run it on clips."""
    model_module = pytest.importorskip("dtx_latte.model")
    from dtx.conditioning import ClassLabelConditioner

    torch.manual_seed(0)
    model = model_module.Latte(input_size=32, patch_size=8, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                               num_frames=4, num_classes=10, use_image_num=2, learn_sigma=False)
    data = MovingDigits("test", frames=4, use_image_num=2)
    members = []
    for key, cond in (("y", ClassLabelConditioner()), ("y_image", ImageLabelConditioner())):
        cond.bind(model, data.info)
        members.append(Member(key, key, cond, cond.default_dropout, {}))
    stage = ConditioningStage(members)
    batch = next(iter(DataLoader(data, batch_size=3)))
    kwargs = stage.training_kwargs(batch, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert set(kwargs) == {"y", "y_image"} and kwargs["y_image"].shape == (3, 2)
    out = model(batch["x"], torch.tensor([1, 500, 999]), **kwargs)
    assert out.shape == (3, 6, 1, 32, 32)
    out.square().mean().backward()

    raw, n = stage.request_fields(SampleRequest(classes=[4, 5]), per_subject=1)
    steps = stage.guidance_steps(2.0)
    sets, scales = stage.condition_sets(SampleRequest(classes=[4, 5]), raw, steps, torch.device("cpu"))
    assert n == 2 and scales == [2.0] and [sorted(s) for s in sets] == [["y"], ["y"]]
    assert sets[0]["y"].tolist() == [10, 10] and sets[1]["y"].tolist() == [4, 5]
    with torch.no_grad():
        for kw in sets:  # sampled clips: 4 frames, no images, no y_image
            assert model(torch.randn(2, *data.info.sample_shape), torch.tensor([10, 10]), **kw).shape == (2, 4, 1,
                                                                                                          32, 32)
