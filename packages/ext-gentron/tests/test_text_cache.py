"""Pre-extracted text embeddings: shards round-trip to the encoder's keywords, nulls and prompts work without it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from dtx.conditioning import ConditioningStage, Member, SampleRequest
from dtx.data import collate
from dtx.errors import ConfigError, DataError
from dtx_gentron.text import TextConditioner
from dtx_gentron.text_cache import (METADATA, PrecomputedTextConditioner, TextEmbeddingShards,
                                    extract_text_embeddings)

CPU = torch.device("cpu")
CAPTIONS = ["a red digit", "the big blue cat on a small dog", "", "a written seven", "two"]
FP16 = {"atol": 2e-3, "rtol": 2e-3}
pytestmark = pytest.mark.filterwarnings("ignore:text encoder.*truncated:UserWarning")  # CAPTIONS[1] is cut


class Captioned(Dataset):
    """Five captioned 1x4x4 images with labels."""

    def __init__(self) -> None:
        self.x = torch.randn(len(CAPTIONS), 1, 4, 4, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(CAPTIONS)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "text": CAPTIONS[i], "y": i % 3}



@pytest.fixture(scope="module")
def extracted(encoders, tmp_path_factory):
    cond = TextConditioner(encoder=encoders["bert"], max_length=8)
    out = extract_text_embeddings(Captioned(), cond, tmp_path_factory.mktemp("emb") / "out", shard_size=3,
                                  batch_size=2)
    return cond, out


def all_fields(ds: Dataset) -> dict:
    return collate([ds[i] for i in range(len(ds))])


def test_round_trip_passes_the_encoders_keywords_through(extracted):
    cond, out = extracted
    ds = TextEmbeddingShards(out)
    assert len(ds) == 5 and len(ds.shards) == 2
    assert ds.info.fields == ("text_context", "text_mask", "text_pooled", "y")
    assert ds.info.sample_shape == (1, 4, 4)
    batch = all_fields(ds)
    torch.testing.assert_close(batch["x"], Captioned().x)
    assert batch["y"].tolist() == [0, 1, 2, 0, 1]
    pre = PrecomputedTextConditioner(path=str(out))
    assert pre.fields == ("text_context", "text_mask", "text_pooled")
    got = pre.encode({f: batch[f] for f in pre.fields}, CPU)
    want = cond.encode({"text": CAPTIONS}, CPU)
    assert set(got) == set(want) == {"context", "context_mask", "pooled"}
    assert torch.equal(got["context_mask"], want["context_mask"])
    torch.testing.assert_close(got["context"], want["context"], **FP16)
    torch.testing.assert_close(got["pooled"], want["pooled"], **FP16)


def test_null_fields_are_the_empty_captions_encoding_and_drive_dropout(extracted):
    cond, out = extracted
    pre = PrecomputedTextConditioner(path=str(out))
    assert pre.default_dropout == 0.1 and pre.has_null
    null = pre.encode(pre.null_fields(2), CPU)
    want = cond.encode({"text": ["", ""]}, CPU)
    assert torch.equal(null["context_mask"], want["context_mask"])
    torch.testing.assert_close(null["context"], want["context"], **FP16)
    torch.testing.assert_close(null["pooled"], want["pooled"], **FP16)
    stage = ConditioningStage([Member("text", "text-embeddings", pre, 0.5, {})])
    batch = all_fields(TextEmbeddingShards(out))
    kwargs = stage.training_kwargs(batch, CPU, torch.Generator().manual_seed(1))
    dropped = torch.rand(5, generator=torch.Generator().manual_seed(1)) < 0.5
    assert 0 < dropped.sum() < 5
    expect = torch.where(dropped[:, None, None], null["context"][:1], batch["text_context"])
    torch.testing.assert_close(kwargs["context"], expect)


def test_learned_null_marks_dropped_rows_with_text_null(encoders, tmp_path):
    cond = TextConditioner(encoder=encoders["clip"], encoder_2=encoders["t5"], max_length=8, max_length_2=10,
                           null="learned")
    out = extract_text_embeddings(Captioned(), cond, tmp_path / "out", shard_size=4)
    pre = PrecomputedTextConditioner(path=str(out))
    assert pre.null == "learned"
    assert pre.fields == ("text_context", "text_mask", "text_pooled", "text_context_2", "text_mask_2")
    batch = all_fields(TextEmbeddingShards(out))
    got = pre.encode({f: batch[f] for f in pre.fields}, CPU)
    want = cond.encode({"text": CAPTIONS}, CPU)
    assert not got["text_null"].any() and torch.equal(got["context_mask_2"], want["context_mask_2"])
    torch.testing.assert_close(got["context_2"], want["context_2"], **FP16)
    null = pre.encode(pre.null_fields(2), CPU)
    assert null["text_null"].all() and null["context_mask"].all() and null["context_mask_2"].all()
    assert not null["context"].any() and not null["context_2"].any() and not null["pooled"].any()
    assert torch.equal(batch["text_mask"], all_fields(TextEmbeddingShards(out))["text_mask"])  # batch untouched


def test_existing_output_is_refused_unless_overwrite(extracted, encoders, tmp_path):
    cond, _ = extracted
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not empty.*overwrite=True"):
        extract_text_embeddings(Captioned(), cond, busy)
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    out = extract_text_embeddings(Captioned(), cond, tmp_path / "out", shard_size=2)
    assert len(TextEmbeddingShards(out).shards) == 3
    with pytest.raises(ConfigError, match="overwrite"):
        extract_text_embeddings(Captioned(), cond, out, shard_size=5)
    extract_text_embeddings(Captioned(), cond, out, shard_size=5, overwrite=True)
    assert len(TextEmbeddingShards(out).shards) == 1 and len(list(out.glob("shard_*"))) == 1
    (out / METADATA).unlink()
    with pytest.raises(DataError, match="did not finish"):
        TextEmbeddingShards(out)


def test_prompts_are_encoded_by_the_recorded_encoder(extracted, encoders):
    cond, out = extracted
    pre = PrecomputedTextConditioner(path=str(out))
    assert pre.subjects(SampleRequest()) is None
    request = SampleRequest(prompts=["a red digit", "a blue cat"], negative_prompt="a dog")
    subjects = pre.subjects(request)
    assert len(subjects) == 2 and subjects[0]["text_context"].shape == (1, 8, 8)
    got = pre.encode(subjects[1], CPU)
    torch.testing.assert_close(got["context"], cond.encode({"text": ["a blue cat"]}, CPU)["context"])
    neg = pre.guidance_null(request, 3)
    assert neg["text_context"].shape == (3, 8, 8)
    torch.testing.assert_close(neg["text_pooled"][2:], cond.encode({"text": ["a dog"]}, CPU)["pooled"])
    # sampling where the shards are gone: the encoder options alone give prompts and the null
    bare = PrecomputedTextConditioner(encoder=encoders["bert"], max_length=8)
    torch.testing.assert_close(bare.null_fields(1)["text_context"], pre.null_fields(1)["text_context"], **FP16)


def test_options_are_checked_against_the_metadata(extracted, encoders):
    _, out = extracted
    with pytest.raises(ConfigError, match="max_length=16 disagrees"):
        PrecomputedTextConditioner(path=str(out), max_length=16)
    with pytest.raises(ConfigError, match="path.*encoder"):
        PrecomputedTextConditioner()
    pre = PrecomputedTextConditioner(path=str(out), encoder=encoders["bert"])
    model = nn.Linear(2, 2)
    model.context_dim = 8
    pre.bind(model, TextEmbeddingShards(out).info)
    model.context_dim = 384
    with pytest.raises(ConfigError, match="context_dim=384"):
        pre.bind(model, TextEmbeddingShards(out).info)


def test_extract_text_command_encodes_a_registered_dataset(tmp_path, encoders, capsys):
    """`dtx extract-text` writes what the library function writes: every caption of captioned-digits' test split,
    each equal to the text conditioner's own encoding; a bad option is one error line and writes nothing."""
    import json

    from dtx.cli import main
    from dtx_gentron.data import CaptionedDigits

    out = tmp_path / "emb"
    bad = main(["extract-text", "captioned-digits", str(out), "--data", "split=test",
                "--text", f"encoder={encoders['bert']}", "max_lenght=8"])
    assert bad == 2 and not out.exists()
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("dtx: error:")
    assert main(["extract-text", "captioned-digits", str(out), "--data", "split=test",
                 "--text", f"encoder={encoders['bert']}", "max_length=8", "--shard-size", "100"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    data = CaptionedDigits("test")
    ds = TextEmbeddingShards(out)
    assert report["count"] == len(ds) == len(data) and len(ds.shards) == -(-len(data) // 100)
    assert report["recipe"]["data"] == {"name": "text-embeddings", "options": {"path": str(out)}}
    cond = TextConditioner(encoder=encoders["bert"], max_length=8)
    for i in (0, len(data) - 1):
        want = cond.encode({"text": [data[i]["text"]]}, CPU)
        torch.testing.assert_close(ds[i]["text_context"], want["context"][0], **FP16)
        assert torch.equal(ds[i]["text_mask"], want["context_mask"][0])
        torch.testing.assert_close(ds[i]["x"], data[i]["x"])
