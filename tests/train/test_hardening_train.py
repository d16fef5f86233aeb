"""Issue 16 (train half): stale checkpoint temporaries are cleaned, bad run settings fail at resolution."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lorakit.train import run_training
from lorakit.train.checkpoint import clean_stale, latest_checkpoint

from .conftest import tiny_cfg


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _plant(ckdir, pid):
    d = ckdir / f".step-000004.tmp{pid}"
    (d / "adapter").mkdir(parents=True)
    (d / "trainer_state.pt").write_bytes(b"half written")
    (ckdir / f".latest.tmp{pid}").write_text("step-000004")
    return d


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    ck = tmp_path / "checkpoints"
    dead = _plant(ck, _dead_pid())
    live = _plant(ck, os.getpid())  # a writer that still runs (this process)
    other = ck / ".step-000001.tmpabc"  # not ours: not a temporary name
    other.mkdir()
    gone = clean_stale(ck)
    assert not dead.exists() and not any(p.name.startswith(".latest.tmp") and p.name != f".latest.tmp{os.getpid()}"
                                         for p in ck.iterdir())
    assert live.exists() and other.exists() and len(gone) == 2


def test_resume_after_kill_cleans_stale_temporaries(tiny_lm_dir, cls_data, tmp_path):
    cfg = tiny_cfg(tiny_lm_dir, cls_data, tmp_path / "a", steps=4, save_every=2)
    run_training(cfg)
    ck = tmp_path / "a" / "checkpoints"
    stale = _plant(ck, _dead_pid())
    assert latest_checkpoint(tmp_path / "a").name == "step-000004"
    assert not stale.exists()
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith(".")) == []
    _plant(ck, _dead_pid())
    run_training(dict(cfg, train={**cfg["train"], "steps": 6}), resume=True)
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith(".")) == []
