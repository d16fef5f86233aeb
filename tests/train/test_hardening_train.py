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


# ---------------------------------------------------------------- items 13, 14: lorakit train's bad input
import json  # noqa: E402

from lorakit.cli import main  # noqa: E402
from lorakit.errors import ConfigError  # noqa: E402
from lorakit.train import resolve  # noqa: E402


@pytest.mark.parametrize("override", [
    "data.eval_batch_size=0", "data.batch_size=-1", "data.max_new_tokens=0", "data.eval_size=0",
    "optim.betas=[2,3]", "optim.betas=[0.9]", "optim.eps=0", "optim.lr=.nan", "optim.weight_decay=-1",
    "optim.min_lr_ratio=2", "optim.max_grad_norm=.inf", "optim.warmup=-0.1",
    "train.steps=0", "train.grad_accum=0", "train.threads=0", "train.keep_checkpoints=0", "train.log_every=-1",
    "train.device=gpu", "train.device=cpu:1", "output.dir=runs/{nope}", "output.dir=runs/{task", "output.dir={0}",
    "data.prompt={foo}", "data.prompt=Review: {text} {label}", "data.prompt=no placeholder", "data.prompt={text!r}",
    "adapter.r=0", "adapter.r=-3", "adapter.dropout=1.5", "data.labels=[]"])
def test_bad_settings_fail_at_resolution(override, capsys):
    with pytest.raises(ConfigError):
        resolve(overrides=[override])
    assert main(["train", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit train: error:") and "Traceback" not in err


def test_cuda_without_cuda_is_refused(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["train", "train.device=cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_non_utf8_data_names_the_line(tmp_path, suffix, capsys):
    p = tmp_path / f"d{suffix}"
    good = [json.dumps({"text": "fine", "label": "a"}), json.dumps({"text": "ok", "label": "b"})] \
        if suffix == ".jsonl" else ["text,label", "fine,a", "ok,b"]
    p.write_bytes("\n".join(good).encode() + b"\n" + (b'{"text": "caf\xe9", "label": "a"}' if suffix == ".jsonl"
                                                       else b"caf\xe9,a") + b"\n")
    assert main(["train", "data.task=classify-lm", f"data.path={p}", "model.name=x"]) == 2
    err = capsys.readouterr().err
    assert "lorakit train: error:" in err and f"{p}:{len(good) + 1}: not UTF-8" in err and "0xe9" in err


def test_yaml_yes_is_a_word_and_true_says_why():
    assert resolve(overrides=["data.label_words=[yes, no]"]).data.label_words == ["yes", "no"]
    with pytest.raises(ConfigError, match="quote it"):
        resolve(overrides=["data.label_words=[true, false]"])


def test_options_and_overrides_in_any_order(tmp_path, monkeypatch):
    import lorakit.cli as cli

    seen = []
    monkeypatch.setattr("lorakit.train.run_training", lambda cfg, **k: seen.append(cfg) or (_ for _ in ()).throw(
        ConfigError("stop")))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("adapter: {method: lora, r: 4}\n")
    orders = [["train", "--method", "dora", str(recipe), "adapter.r=2"],
              ["train", str(recipe), "--method", "dora", "adapter.r=2"],
              ["train", "adapter.r=2", "--method", "dora", str(recipe)],
              ["train", str(recipe), "adapter.r=2", "--method", "dora"]]
    for argv in orders:
        assert cli.main(argv) == 2
    assert len(seen) == 4
    assert all(c.adapter["method"] == "dora" and c.adapter["r"] == 2 for c in seen)
    with pytest.raises(SystemExit):
        cli.main(["train", str(recipe), "--bogus-option"])


# ---------------------------------------------------------------- item 15: targets follow the model, checked early
def test_wrong_targets_fail_before_any_evaluation(tiny_lm_dir, cls_data, tmp_path):
    from lorakit.errors import TargetError

    evals = []

    class Watch:
        def on_eval(self, phase, metrics):
            evals.append(phase)

    cfg = tiny_cfg(tiny_lm_dir, cls_data, tmp_path / "t", steps=1)
    with pytest.raises(TargetError, match="matched no module"):
        run_training(dict(cfg, adapter={**cfg["adapter"], "targets": ["query", "value"]}), callbacks=[Watch()])
    with pytest.raises(ConfigError, match="exceeds"):
        run_training(dict(cfg, adapter={**cfg["adapter"], "r": 2 ** 40}), callbacks=[Watch()])
    assert evals == []


def test_all_attention_follows_the_architecture(tiny_lm_dir):
    from lorakit.targets import match
    from conftest import tiny_llama

    import torch.nn as nn

    class Bert(nn.Module):  # BERT's names: attention.self.{query,key,value}, attention.output.dense
        def __init__(self):
            super().__init__()
            layer = nn.Module()
            layer.attention = nn.Module()
            layer.attention.self = nn.Module()
            for n in ("query", "key", "value"):
                setattr(layer.attention.self, n, nn.Linear(4, 4))
            layer.attention.output = nn.Module()
            layer.attention.output.dense = nn.Linear(4, 4)
            layer.intermediate = nn.Module()
            layer.intermediate.dense = nn.Linear(4, 8)
            self.encoder = nn.Module()
            self.encoder.layer = nn.ModuleList([layer])
            self.classifier = nn.Linear(4, 2)

    assert match(Bert(), "all-attention") == ["encoder.layer.0.attention.self.query",
                                              "encoder.layer.0.attention.self.key",
                                              "encoder.layer.0.attention.self.value",
                                              "encoder.layer.0.attention.output.dense"]
    llama = tiny_llama()
    got = match(llama, "all-attention")
    assert got and all(p.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "o_proj") for p in got)
    assert len(got) == 4 * llama.config.num_hidden_layers
