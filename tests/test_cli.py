"""The `lorakit` command line on tiny local models (fast) plus a real SIGINT to a subprocess."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorakit.cli import main, methods_markdown, parse_targets

from train.conftest import tiny_cfg  # noqa: F401 - fixtures below come from tests/train/conftest.py
from train.conftest import cls_data, tiny_lm_dir  # noqa: F401


def _overrides(model_dir, data, out, **extra):
    kv = {"model.name": model_dir, "data.task": "classify-lm", "data.path": data, "data.max_length": 32,
          "data.eval_size": 16, "adapter.targets": "all-linear", "adapter.r": 4, "optim.lr": 0.01,
          "train.steps": 4, "output.dir": out, **extra}
    return [f"{k}={v}" for k, v in kv.items()]


def test_train_eval_generate(tiny_lm_dir, cls_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *_overrides(tiny_lm_dir, cls_data, out)]) == 0
    text = capsys.readouterr().out
    assert "before" in text and "after" in text and "accuracy" in text and str(out / "adapter") in text
    assert main(["eval", "--adapter", str(out / "adapter"), "--base"]) == 0
    text = capsys.readouterr().out
    assert "adapter" in text and "base" in text and "macro_f1" in text
    assert main(["generate", "--adapter", str(out / "adapter"), "good movie", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_method_swap_from_methods_dir(tiny_lm_dir, cls_data, tmp_path, monkeypatch, capsys):
    from lorakit.train import config as tc

    (tmp_path / "configs" / "methods").mkdir(parents=True)
    (tmp_path / "configs" / "methods" / "dora.yaml").write_text("adapter:\n  method: dora\n  r: 2\noptim:\n  lr: 0.005\n")
    monkeypatch.setattr(tc, "CONFIG_DIRS", [tmp_path / "configs"])
    cfg = tc.resolve(None, ["adapter.targets=[q_proj]"], method="dora")
    assert cfg.adapter == {"method": "dora", "r": 2, "targets": ["q_proj"]} and cfg.optim.lr == 0.005
    cfg = tc.resolve(None, [], method="lora")  # no file: only the method name changes
    assert cfg.adapter["method"] == "lora" and cfg.adapter["r"] == 8


def test_method_swap_keeps_the_recipes_trainable_head(tmp_path, monkeypatch):
    """A recipe's ``trainable`` is the task's (a new head) and a method file's is the method's (LongLoRA's
    embeddings and norms): the swap trains both, the recipe's first, instead of dropping the head."""
    from lorakit.train import config as tc

    (tmp_path / "configs" / "methods").mkdir(parents=True)
    (tmp_path / "configs" / "methods" / "longlora.yaml").write_text(
        "adapter:\n  method: longlora\n  trainable: [embed_tokens, score, norm]\n")
    monkeypatch.setattr(tc, "CONFIG_DIRS", [tmp_path / "configs"])
    recipe = tmp_path / "head.yaml"
    recipe.write_text("adapter:\n  method: lora\n  trainable: [score]\n")
    assert tc.resolve(recipe, method="longlora").adapter["trainable"] == ["score", "embed_tokens", "norm"]
    recipe.write_text("adapter:\n  method: lora\n")
    assert tc.resolve(recipe, method="longlora").adapter["trainable"] == ["embed_tokens", "score", "norm"]
    (tmp_path / "configs" / "methods" / "dora.yaml").write_text("adapter:\n  method: dora\n")
    recipe.write_text("adapter:\n  method: lora\n  trainable: [score]\n")
    assert tc.resolve(recipe, method="dora").adapter["trainable"] == ["score"]
    # an override after the swap still decides
    assert tc.resolve(recipe, ["adapter.trainable=[lm_head]"], method="longlora").adapter["trainable"] == ["lm_head"]


def test_default_config_equals_the_recipe():
    from lorakit.train import DEFAULT, resolve

    recipe = Path(__file__).resolve().parents[1] / "configs" / "sentiment-smollm2-lora.yaml"
    assert resolve(recipe).to_dict() == resolve().to_dict() == resolve(base=DEFAULT).to_dict()


@pytest.mark.parametrize("recipe", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")))
def test_recipes_are_valid(recipe):
    from lorakit.train import resolve

    resolve(recipe)


@pytest.mark.parametrize("args,msg", [
    (["train", "train.stpes=3"], "did you mean 'steps'"),
    (["train", "optimizer.lr=1"], "unknown section 'optimizer'"),
    (["train", "adapter.method=nosuch"], "nosuch"),
    (["train", "/nonexistent.yaml"], "config file not found"),
    (["eval", "--adapter", "/nonexistent"], "adapter directory not found"),
])
def test_errors_exit_2_with_message(args, msg, capsys):
    assert main(args) == 2
    assert msg in capsys.readouterr().err


def test_methods_and_markdown(tmp_path, capsys):
    assert main(["methods"]) == 0
    assert "lora" in capsys.readouterr().out
    p = tmp_path / "methods.md"
    assert main(["methods", "--markdown", str(p)]) == 0
    assert p.read_text() == methods_markdown() and "| `lora` |" in p.read_text()


def test_the_committed_methods_page_is_the_generated_one():
    """docs/methods.md is generated from the method docstrings: an edited docstring without a regenerated page
    (`lorakit methods --markdown docs/methods.md`) fails here instead of shipping a stale page."""
    page = Path(__file__).resolve().parents[1] / "docs" / "methods.md"
    assert page.read_text() == methods_markdown(), "stale: run lorakit methods --markdown docs/methods.md"


def test_inspect(tiny_lm_dir, capsys):
    assert main(["inspect", str(tiny_lm_dir), "--targets", "q_proj,v_proj"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in out and "4 of" in out
    assert main(["inspect", str(tiny_lm_dir), "--targets", r".*\.mlp\..*", "--layers", "1", "--summary"]) == 0
    assert "3 of" in capsys.readouterr().out
    assert main(["inspect", str(tiny_lm_dir), "--targets", "nothing_here"]) == 2
    assert parse_targets(["all-linear"]) == "all-linear" and parse_targets(["a,b"]) == ["a", "b"]


def test_assets_list(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    assert main(["assets"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path) in out and "sentiment" in out and "lorakit assets prepare" in out


def test_sigint_saves_checkpoint_and_exits_cleanly(tiny_lm_dir, cls_data, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-m", "lorakit.cli", "train", *_overrides(tiny_lm_dir, cls_data, out, **{
        "train.steps": 100000, "data.eval_size": 4})]
    # SIGINT back to its default in the child: a test run started in the background inherits it ignored
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and '"event": "train"' not in (metrics.read_text() if metrics.exists() else ""):
        time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr[-2000:]
    assert "checkpoint saved" in stdout and "--resume" in stdout
    ck = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert (ck / "trainer_state.pt").is_file() and (ck / "adapter_model.safetensors").is_file()
    assert json.loads(metrics.read_text().splitlines()[-1])["event"] == "interrupted"


def test_python_dash_m_lorakit_is_the_command():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    r = subprocess.run([sys.executable, "-m", "lorakit", "methods"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "dora" in r.stdout and "pissa" in r.stdout
