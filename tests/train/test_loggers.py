"""train.report_to: TensorBoard and wandb (offline) receive the same scalars as metrics.jsonl."""
from __future__ import annotations

import json
import os

import pytest

from lorakit.errors import ConfigError
from lorakit.train import resolve, run_training

from .conftest import tiny_cfg


def _jsonl_scalars(path):
    """{tag: {step: value}} built from metrics.jsonl the way the reporters must name them."""
    out: dict[str, dict[int, float]] = {}
    for ln in path.read_text().splitlines():
        rec = json.loads(ln)
        if rec["event"] not in ("train", "eval"):
            continue
        for k, v in rec.items():
            if k in ("event", "step", "phase") or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            out.setdefault(f"{rec['event']}/{k}", {})[rec["step"]] = float(v)
    return out


def test_tensorboard_event_file_holds_the_metrics_jsonl_scalars(tiny_lm_dir, cls_data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_cfg(tiny_lm_dir, cls_data, tmp_path / "run", steps=4, report_to=["jsonl", "tensorboard"])
    run_training(cfg)
    out = tmp_path / "run"
    want = _jsonl_scalars(out / "metrics.jsonl")
    assert {"train/loss", "train/lr", "train/grad_norm", "eval/loss", "eval/accuracy"} <= set(want)
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == set(want)
    for tag, by_step in want.items():
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert set(got) == set(by_step), tag
        for s, v in by_step.items():
            assert got[s] == pytest.approx(v, rel=1e-6, abs=1e-7), (tag, s)  # event files store float32


def test_tensorboard_resume_drops_the_steps_after_the_checkpoint(tiny_lm_dir, cls_data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lorakit.train import TrainingInterrupted

    cfg = tiny_cfg(tiny_lm_dir, cls_data, tmp_path / "run", steps=6, save_every=2, report_to=["tensorboard"])

    class StopAt:
        def on_step(self, step, logs):
            if step == 3:
                raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        run_training(cfg, callbacks=[StopAt()])
    run_training(cfg, resume=True)
    out = tmp_path / "run"
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == [1, 2, 3, 4, 5, 6]  # step 3 of the interrupted run is replaced, not duplicated
    want = _jsonl_scalars(out / "metrics.jsonl")["train/loss"]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([want[s] for s in steps], rel=1e-6)


def _wandb_history(path) -> dict[str, dict[int, float]]:
    """The logged rows of an offline ``run-*.wandb`` file (a LevelDB-style log of protobuf ``Record``s: a 7-byte
    header, 32 KiB blocks of chunks with a 7-byte chunk header: crc32c, little-endian length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    pos, block, buf, records = 7, 32768, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        n, kind = int.from_bytes(raw[pos + 4:pos + 6], "little"), raw[pos + 6]
        if n == 0 and kind == 0:
            break
        buf += raw[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST
            records.append(buf)
            buf = b""
    hist: dict[str, dict[int, float]] = {}
    for data in records:
        rec = pb.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            step = int(row.pop("_step"))
            for k, v in row.items():
                if not k.startswith("_"):
                    hist.setdefault(k, {})[step] = float(v)
    return hist


def test_wandb_offline_run_gets_the_scalars(tiny_lm_dir, cls_data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_cfg(tiny_lm_dir, cls_data, tmp_path / "run", steps=3, report_to=["wandb"])
    run_training(cfg)
    out = tmp_path / "run"
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    got = _wandb_history(runs[0])
    want = _jsonl_scalars(out / "metrics.jsonl")
    assert set(got) == set(want)
    for tag, by_step in want.items():
        assert got[tag] == pytest.approx(by_step, rel=1e-9), tag


def test_report_to_is_validated_at_resolve(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown reporter 'tensorbord'.*did you mean 'tensorboard'"):
        resolve(overrides=["train.report_to=[jsonl,tensorbord]"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    with pytest.raises(ConfigError, match="needs the 'wandb' package.*pip install wandb"):
        resolve(overrides=["train.report_to=[wandb]"])
    assert resolve().train.report_to == ["jsonl"]
