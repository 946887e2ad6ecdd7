"""Text encoders as conditioners: tiny random CLIP/T5/BERT towers from local folders, offline."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

from dtx.conditioning import SampleRequest
from dtx.data.info import DataInfo
from dtx.errors import ConfigError, DataError
from dtx_gentron.text import TextConditioner

CPU = torch.device("cpu")
WIDTHS = {"clip": 16, "t5": 12, "bert": 8}
TOWERS = {"clip": "CLIPTextModel", "t5": "T5EncoderModel", "bert": "BertModel"}
INFO = DataInfo(channels=1, height=8, width=8, fields=("text",))



def n_tokens(cond: TextConditioner, text: str) -> int:
    return len(cond.towers[0].tokenizer(text)["input_ids"])


@pytest.mark.parametrize("kind", sorted(WIDTHS))
def test_each_tower_loads_offline_and_encodes_to_the_documented_shapes(encoders, kind):
    cond = TextConditioner(encoder=encoders[kind], max_length=10)
    assert type(cond.towers[0].model).__name__ == TOWERS[kind]
    assert cond.hidden_size == WIDTHS[kind] and cond.hidden_size_2 is None
    out = cond.encode({"text": ["a red digit", "the big blue cat on a small dog"]}, CPU)
    assert set(out) == {"context", "context_mask", "pooled"}
    d = WIDTHS[kind]
    assert out["context"].shape == (2, 10, d) and out["context"].dtype == torch.float32
    assert out["context_mask"].shape == (2, 10) and out["context_mask"].dtype == torch.bool
    assert out["pooled"].shape == (2, d)
    assert out["context_mask"].sum(1).tolist() == [5, 10]  # [CLS] a red digit [SEP]; the long one is cut to 10
    assert torch.all(out["context"][~out["context_mask"]] == 0)  # padding zeroed


@pytest.mark.parametrize("kind", sorted(WIDTHS))
def test_padding_and_batch_neighbours_change_nothing(encoders, kind):
    caption, longer = "a red digit", "the big blue cat on a small dog with a white digit"
    short = TextConditioner(encoder=encoders[kind], max_length=16)
    wide = TextConditioner(encoder=encoders[kind], max_length=24)
    alone = short.encode({"text": [caption]}, CPU)
    batched = short.encode({"text": [longer, caption]}, CPU)
    padded = wide.encode({"text": [caption]}, CPU)
    n = n_tokens(short, caption)
    for other in (batched, padded):
        row = 1 if other is batched else 0
        assert other["context_mask"][row].sum() == n and other["context_mask"][row, :n].all()
        torch.testing.assert_close(other["context"][row, :n], alone["context"][0, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(other["pooled"][row], alone["pooled"][0], atol=1e-5, rtol=1e-5)
    assert alone["context_mask"][0].tolist() == [True] * n + [False] * (16 - n)


def test_pooled_mean_is_the_masked_mean_of_the_last_hidden_state(encoders):
    cond = TextConditioner(encoder=encoders["bert"], max_length=12)
    texts = ["a red digit", "the big blue cat on a small dog"]
    out = cond.encode({"text": texts}, CPU)
    tower = cond.towers[0]
    tokens = tower.tokenizer(texts, padding="max_length", max_length=12, return_tensors="pt")
    with torch.no_grad():
        hidden = tower.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
    for i in range(2):
        valid = tokens["attention_mask"][i].bool()
        torch.testing.assert_close(out["pooled"][i], hidden[i][valid].mean(0), atol=1e-6, rtol=1e-5)


def test_encoder_pooling_is_clips_pooler_output_and_refused_for_t5(encoders):
    cond = TextConditioner(encoder=encoders["clip"], max_length=10, pooling="encoder")
    out = cond.encode({"text": ["a red digit"]}, CPU)
    tower = cond.towers[0]
    tokens = tower.tokenizer(["a red digit"], padding="max_length", max_length=10, return_tensors="pt")
    with torch.no_grad():
        want = tower.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
    torch.testing.assert_close(out["pooled"], want)
    with pytest.raises(ConfigError, match="pooling"):
        TextConditioner(encoder=encoders["t5"], pooling="encoder")


def test_truncation_is_reported_once_per_count_and_counted(encoders):
    cond = TextConditioner(encoder=encoders["bert"], max_length=4)
    with pytest.warns(UserWarning, match=r"1 caption\(s\) longer than max_length=4"):
        cond.encode({"text": ["a big red digit", "a"]}, CPU)
    assert cond.truncated == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cond.encode({"text": ["a big red digit"]}, CPU)  # same count: counted, not warned again
        cond.encode({"text": ["a"]}, CPU)
    assert cond.truncated == 2
    with pytest.warns(UserWarning, match=r"2 caption\(s\)"):
        cond.encode({"text": ["a big red digit", "the small blue cat"]}, CPU)
    assert cond.truncated == 4


def test_encoder_is_frozen_and_never_part_of_a_model_beside_it(encoders):
    cond = TextConditioner(encoder=encoders["bert"], max_length=8)
    model = nn.Linear(WIDTHS["bert"], 4)
    params = list(cond.towers[0].model.parameters())
    assert params and not any(p.requires_grad for p in params)
    assert not cond.towers[0].model.training
    owned = {id(p) for p in model.parameters()} | {id(t) for t in model.state_dict().values()}
    assert not any(id(p) in owned for p in params)
    assert not any(k.startswith("towers") for k in model.state_dict())
    out = cond.encode({"text": ["a red digit"]}, CPU)
    assert not out["context"].requires_grad and out["context"].grad_fn is None


def test_learned_null_emits_text_null_and_empty_null_caches_the_empty_caption(encoders):
    learned = TextConditioner(encoder=encoders["bert"], max_length=8, null="learned")
    assert learned.null_fields(2) == {"text": [None, None]}
    out = learned.encode({"text": ["a red digit", None]}, CPU)
    assert out["text_null"].tolist() == [False, True]
    assert torch.all(out["context"][1] == 0) and out["context_mask"][1].all() and torch.all(out["pooled"][1] == 0)
    empty = TextConditioner(encoder=encoders["bert"], max_length=8)
    assert empty.null_fields(2) == {"text": ["", ""]} and empty.default_fields(1) == {"text": [""]}
    assert empty.default_dropout == 0.1 and empty.has_null
    null = empty.encode(empty.null_fields(2), CPU)
    assert "text_null" not in null
    tokens = empty.towers[0].tokenizer([""], padding="max_length", max_length=8, return_tensors="pt")
    with torch.no_grad():
        hidden = empty.towers[0].model(**{k: tokens[k] for k in ("input_ids", "attention_mask")}).last_hidden_state
    assert null["context_mask"][0].sum() == 2  # [CLS] [SEP]
    torch.testing.assert_close(null["context"][1, :2], hidden[0, :2])
    with pytest.raises(DataError, match="null='learned'"):
        empty.encode({"text": [None]}, CPU)


def test_prompts_subjects_and_negative_prompt_guidance(encoders):
    cond = TextConditioner(encoder=encoders["bert"], max_length=8)
    assert cond.subjects(SampleRequest()) is None
    request = SampleRequest(prompts=["a red digit", "a blue cat"], negative_prompt="a dog")
    assert cond.subjects(request) == [{"text": ["a red digit"]}, {"text": ["a blue cat"]}]
    assert cond.guidance_null(request, 3) == {"text": ["a dog"] * 3}
    assert cond.guidance_null(SampleRequest(prompts=["a cat"]), 2) == {"text": ["", ""]}
    learned = TextConditioner(encoder=encoders["bert"], null="learned")
    assert learned.guidance_null(SampleRequest(prompts=["a cat"]), 2) == {"text": [None, None]}


def test_two_encoders_emit_context_2_with_each_width(encoders):
    cond = TextConditioner(encoder=encoders["clip"], encoder_2=encoders["t5"], max_length=8, max_length_2=12,
                           null="learned")
    assert (cond.hidden_size, cond.hidden_size_2) == (WIDTHS["clip"], WIDTHS["t5"])
    out = cond.encode({"text": ["a red digit", None, ""]}, CPU)
    assert out["context"].shape == (3, 8, WIDTHS["clip"]) and out["pooled"].shape == (3, WIDTHS["clip"])
    assert out["context_2"].shape == (3, 12, WIDTHS["t5"]) and out["context_mask_2"].shape == (3, 12)
    assert out["text_null"].tolist() == [False, True, False] and out["context_mask_2"][1].all()
    assert out["context_mask_2"][0].sum() == 5 and out["context_mask_2"][2].sum() == 2


def test_bind_checks_the_models_context_dim(encoders):
    cond = TextConditioner(encoder=encoders["bert"])
    model = nn.Linear(2, 2)
    cond.bind(model, INFO)  # no context_dim: nothing to check
    model.context_dim = WIDTHS["bert"]
    cond.bind(model, INFO)
    model.context_dim = 99
    with pytest.raises(ConfigError, match="context_dim=99.*hidden size 8"):
        cond.bind(model, INFO)
    other = nn.Linear(2, 2)
    other.config = {"context_dim": 7}
    with pytest.raises(ConfigError, match="context_dim"):
        cond.bind(other, INFO)


def test_bad_options_and_missing_folders_are_named(encoders, tmp_path):
    with pytest.raises(ConfigError, match="pooling"):
        TextConditioner(encoder=encoders["bert"], pooling="max")
    with pytest.raises(ConfigError, match="null"):
        TextConditioner(encoder=encoders["bert"], null="zeros")
    with pytest.raises(ConfigError, match="no such folder"):
        TextConditioner(encoder=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="not-a-model"):
        TextConditioner(encoder="someone/not-a-model")  # a hub id, offline and not cached


@pytest.mark.slow
def test_the_minilm_default_loads_offline_with_width_384():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    cond = TextConditioner()
    assert cond.hidden_size == 384
    out = cond.encode({"text": ["a handwritten seven", ""]}, CPU)
    assert out["context"].shape == (2, 32, 384) and out["pooled"].shape == (2, 384)


def test_cache_encodes_each_distinct_caption_once_with_the_same_result(encoders):
    plain = TextConditioner(encoder=encoders["bert"], max_length=12)
    cached = TextConditioner(encoder=encoders["bert"], max_length=12, cache=2)
    calls = []
    tower = cached.towers[0]
    original = tower.encode
    tower.encode = lambda texts, device: calls.append(list(texts)) or original(texts, device)
    batch = {"text": ["a red digit", "the blue cat", "a red digit", ""]}
    first, again = cached.encode(batch, CPU), cached.encode(batch, CPU)
    # duplicates and the second batch come from the cache; the empty caption is encoded once, by itself
    assert sorted(calls) == [[""], ["a red digit", "the blue cat"]]
    expected = plain.encode(batch, CPU)
    for key in expected:
        torch.testing.assert_close(first[key], expected[key], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(again[key], expected[key], atol=1e-5, rtol=1e-5)
    cached.encode({"text": ["a small dog"]}, CPU)  # evicts the least recently used caption
    assert list(cached._cache) == ["a red digit", "a small dog"]  # "the blue cat" was used least recently
    with pytest.raises(ConfigError, match="cache"):
        TextConditioner(encoder=encoders["bert"], cache=-1)
