"""``lorakit train`` under ``torchrun`` with 2 CPU processes (gloo): FSDP2 and DDP against one process.

One ``python -m torch.distributed.run --nproc-per-node 2`` start runs every distributed job through the CLI
(``tests/train/_fsdp_runner.py``), each job joining and leaving the launcher's process group as ``lorakit train``
does; the single-process references run here with the same global batch (``data.batch_size`` is global: 2 ranks
take 4 rows each of every 8). The tiny Llama has no dropout and the classification loss has one label token per
row, so the mean of the ranks' mean losses is the global mean and the adapters must agree to float rounding.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lorakit.errors import ConfigError
from lorakit.io import _read_tensors

from .conftest import tiny_cfg

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5

ADAPTERS = {
    "lora": {"method": "lora", "targets": "all-linear", "r": 4, "alpha": 8, "seed": 0},
    "dora": {"method": "dora", "targets": "all-linear", "r": 4, "alpha": 8, "seed": 0},
    # the controller prunes from 4 to 2 triplets per module over the run (budget steps at every step)
    "adalora": {"method": "adalora", "targets": "all-linear", "init_r": 4, "target_r": 2, "alpha": 8,
                "tinit": 0, "tfinal": 1, "deltaT": 1, "seed": 0},
}


def _cfg(model_dir, data, out, adapter, **train):
    c = tiny_cfg(model_dir, data, out, steps=4, eval_before=False, **train)
    c["adapter"] = dict(ADAPTERS[adapter])
    c["data"]["eval_size"] = 8
    return c


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(a: Path, b: Path, tol: float = TOL) -> float:
    ta, tb = _read_tensors(a), _read_tensors(b)
    assert set(ta) == set(tb)
    return max((ta[k].float() - tb[k].float()).abs().max().item() for k in ta if ta[k].numel())


@pytest.fixture(scope="module")
def runs(tiny_lm_dir, cls_data, tmp_path_factory):
    """Single-process references here, then one torchrun start with every distributed job."""
    from lorakit.train import run_training

    tmp = tmp_path_factory.mktemp("fsdp")
    cases = {  # name: (adapter, mode, train extras)
        "fsdp-lora": ("lora", "fsdp", {"save_every": 2, "keep_checkpoints": 5}),
        "fsdp-dora": ("dora", "fsdp", {"grad_accum": 2}),
        "fsdp-adalora": ("adalora", "fsdp", {}),
        "ddp-lora": ("lora", "ddp", {}),
    }
    ref = {}
    for name, (adapter, _, extra) in cases.items():
        key = (adapter, extra.get("grad_accum", 1))
        if key not in ref:
            cfg = _cfg(tiny_lm_dir, cls_data, tmp / f"one-{adapter}-{key[1]}", adapter,
                       grad_accum=key[1])
            if key[1] > 1:
                cfg["data"]["batch_size"] = 4  # the same global batch: 4 rows x 2 accumulation steps either way
            ref[key] = run_training(cfg)
    jobs = []
    for name, (adapter, mode, extra) in cases.items():
        cfg = _cfg(tiny_lm_dir, cls_data, tmp / name, adapter, distributed=mode, **extra)
        if extra.get("grad_accum", 1) > 1:
            cfg["data"]["batch_size"] = 4  # global micro-batch 4: 2 rows per rank, 2 accumulation steps
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        jobs.append({"args": ["train", str(tmp / f"{name}.yaml")]})
    # resume under FSDP2: a fresh output dir holding fsdp-lora's step-2 checkpoint, continued to step 4
    cfg = _cfg(tiny_lm_dir, cls_data, tmp / "fsdp-resume", "lora", distributed="fsdp", save_every=2)
    (tmp / "fsdp-resume.yaml").write_text(yaml.safe_dump(cfg))
    jobs.append({"args": ["train", str(tmp / "fsdp-resume.yaml"), "--resume"],
                 "copy": [str(tmp / "fsdp-lora" / "checkpoints" / "step-000002"), str(tmp / "fsdp-resume")]})
    jobs.append({"grads": str(tmp / "grads.json")})
    jobs.append({"hf": str(tmp / "hf"), "model": str(tiny_lm_dir)})
    for job in jobs:
        job["port"] = _free_port()
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    logf = tmp / "torchrun.log"
    with logf.open("w") as fh:
        p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                              "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
                              str(ROOT / "tests" / "train" / "_fsdp_runner.py"), str(tmp / "jobs.json")],
                             env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # the launcher and both workers (a hung collective never returns)
            p.wait()
            pytest.fail("torchrun did not finish in 240 s:\n" + logf.read_text()[-6000:])
    assert rc == 0, logf.read_text()[-6000:]
    return {"tmp": tmp, "ref": ref, "cases": cases}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fsdp-lora", "fsdp-dora", "fsdp-adalora", "ddp-lora"])
def test_two_ranks_give_the_single_process_adapter(runs, name):
    adapter, mode, extra = runs["cases"][name]
    ref = runs["ref"][(adapter, extra.get("grad_accum", 1))]
    out = runs["tmp"] / name
    res = json.loads((out / "result.json").read_text())
    assert res["distributed"] == mode and res["world_size"] == 2
    # the logged (all-reduced) loss is the single-process loss of the same global batch
    assert torch.allclose(torch.tensor(res["loss_curve"]), torch.tensor(ref["loss_curve"]), atol=TOL)
    assert _close(Path(ref["adapter_dir"]), out / "adapter") <= TOL
    # and training moved the adapter (the comparison is not between two untouched inits)
    init = {k: v for k, v in _read_tensors(out / "adapter").items()}
    assert any(v.abs().max() > 0 for k, v in init.items() if "lora_B" in k)
    if mode == "fsdp":  # the base really was sharded: rank 0 holds about half of the base parameters
        assert res["params_this_rank"] < 0.6 * res["total_params"] + res["trainable_params"]
    else:
        assert "params_this_rank" not in res
    # rank 0 alone writes the run's files: one metrics stream, one start event
    events = [json.loads(ln)["event"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert events.count("start") == 1 and events.count("end") == 1


@pytest.mark.slow
def test_adalora_controller_acted_identically(runs):
    """AdaLoRA's budget schedule masked singular values (the controller ran on every rank, on averaged
    gradients), and both ranks' masks are the single-process masks (the adapters agree, above)."""
    t = _read_tensors(runs["tmp"] / "fsdp-adalora" / "adapter")
    one = _read_tensors(Path(runs["ref"][("adalora", 1)]["adapter_dir"]))
    kept = {k: v.numel() for k, v in t.items() if "lora_E" in k}  # the file holds the surviving triplets only
    assert sum(kept.values()) < 4 * len(kept)  # pruned below init_r=4
    assert kept == {k: v.numel() for k, v in one.items() if "lora_E" in k}
    conf = json.loads((runs["tmp"] / "fsdp-adalora" / "adapter" / "adapter_config.json").read_text())
    assert conf["rank_pattern"]


@pytest.mark.slow
def test_resume_under_fsdp_continues_the_run(runs):
    """Both ranks restore the step-2 checkpoint that rank 0 wrote; the resumed run ends on the uninterrupted
    run's adapter and loss curve."""
    out, full = runs["tmp"] / "fsdp-resume", runs["tmp"] / "fsdp-lora"
    res, ref = json.loads((out / "result.json").read_text()), json.loads((full / "result.json").read_text())
    assert res["start_step"] == 2 and res["steps"] == 4
    assert res["loss_curve"] == pytest.approx(ref["loss_curve"], abs=1e-6)
    assert _close(out / "adapter", full / "adapter") <= 1e-6
    assert (full / "checkpoints" / "step-000004" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_gradient_average_follows_presence_on_each_rank(runs):
    g = json.loads((runs["tmp"] / "grads.json").read_text())
    assert g["world"] == 2
    assert g["g0"] == pytest.approx([1.5] * 3)  # (1 + 2) / 2
    assert g["g1"] == pytest.approx([1.0, 2.0, 3.0])  # rank 0's gradient, rank 1 contributing zero
    assert g["g2"] is None  # no rank touched it: stays None, as in one process


# ---- resolve-time validation (no processes) -------------------------------------------------------------------
def test_distributed_mode_is_validated_at_resolution(tiny_lm_dir, cls_data, tmp_path, monkeypatch):
    from lorakit.train import resolve

    base = tiny_cfg(tiny_lm_dir, cls_data, tmp_path)
    with pytest.raises(ConfigError, match="none, ddp, fsdp|'none', 'ddp', 'fsdp'"):
        resolve(base=copy.deepcopy(base), overrides=["train.distributed=zero"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="train.distributed=none"):
        resolve(base=copy.deepcopy(base))
    assert resolve(base=copy.deepcopy(base), overrides=["train.distributed=fsdp"]).train.distributed == "fsdp"
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="data.batch_size=8 .*3 processes"):
        resolve(base=copy.deepcopy(base), overrides=["train.distributed=ddp"])


def test_a_method_that_declares_fsdp_unsupported_is_refused_with_its_reason(tiny_lm_dir, cls_data, tmp_path):
    from lorakit.core import REGISTRY, register
    from lorakit.methods.lora import LoRA
    from lorakit.train import resolve

    @register("fsdp_test_merger", family="test", paper="test")
    class Merger(LoRA):
        fsdp_unsupported = "it merges its factors into the base weight every few steps"

    try:
        base = tiny_cfg(tiny_lm_dir, cls_data, tmp_path)
        base["adapter"]["method"] = "fsdp_test_merger"
        with pytest.raises(ConfigError, match="fsdp_test_merger cannot train with train.distributed=fsdp: it "
                                              "merges its factors"):
            resolve(base=copy.deepcopy(base), overrides=["train.distributed=fsdp"])
        assert resolve(base=copy.deepcopy(base), overrides=["train.distributed=ddp"]).train.distributed == "ddp"
    finally:
        REGISTRY.pop("fsdp_test_merger", None)


def test_every_registered_method_runs_under_fsdp_unless_it_says_why():
    """The sweep (bench/fsdp_methods.py, 2 ranks, recorded in docs/distributed.md) found every registered method
    working under FSDP2; a method added later that cannot must declare ``fsdp_unsupported`` with a reason, and the
    table in docs/distributed.md lists every method."""
    import lorakit
    from lorakit.core import REGISTRY

    doc = (ROOT / "docs" / "distributed.md").read_text()
    for m in lorakit.list_methods():
        cls = REGISTRY[m["name"]]
        assert cls.fsdp_unsupported is None or (isinstance(cls.fsdp_unsupported, str) and cls.fsdp_unsupported)
        assert f"| {m['name']} |" in doc, f"docs/distributed.md's method table lacks {m['name']}"


@pytest.mark.slow
def test_hf_trainer_with_adapter_callback_under_torchrun(runs):
    """The transformers Trainer's own DDP (accelerate, gloo) with AdapterCallback and AdaLoRA: the replicas end
    identical (controllers ran on averaged gradients on every rank) and one process wrote each checkpoint."""
    from safetensors.torch import load_file

    hf = runs["tmp"] / "hf"
    a, b = load_file(str(hf / "rank0.safetensors")), load_file(str(hf / "rank1.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    kept = [v.numel() for k, v in a.items() if "lora_E" in k]
    assert sum(kept) < 4 * len(kept)  # the controller pruned below init_r=4 (the file keeps the survivors)
    for n in (2, 4):
        ck = hf / f"checkpoint-{n}"
        assert (ck / "adapter_model.safetensors").is_file() and (ck / "lorakit_state.pt").is_file()
        assert not list(ck.glob("*.tmp"))
