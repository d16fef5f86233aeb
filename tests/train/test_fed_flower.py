"""``lorakit federate`` on Flower with tiny models: the simulation engine (Ray, in process) and the deployment
engine (a SuperLink and 2 SuperNodes as separate processes on loopback, the run submitted with ``flwr run``), each
ending with a PEFT adapter that loads."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

pytest.importorskip("flwr")

from lorakit.federated import federate  # noqa: E402

from .conftest import tiny_cfg  # noqa: E402

pytestmark = pytest.mark.slow  # Ray start-up / process start-up: 1-2 minutes each on 2 shared cores


def fed_base(model_dir, data, out, **fed):
    base = tiny_cfg(model_dir, data, out)
    base["optim"].update(warmup=0, schedule="constant")
    base["data"]["labels"] = ["positive", "negative"]
    base["train"]["threads"] = 1
    base["federated"] = {"clients": 2, "rounds": 2, "local_steps": 2, "alpha": 0.5, **fed}
    return base


def _flower_processes() -> set[str]:
    out = subprocess.run(["ps", "-eo", "pid,stat,args"], capture_output=True, text=True).stdout
    return {ln for ln in out.splitlines() if ("flower-super" in ln or "flwr-" in ln) and " Z" not in ln}


def test_simulation_engine_ffa(tiny_lm_dir, cls_data, tmp_path):
    res = federate(base=fed_base(tiny_lm_dir, cls_data, tmp_path / "sim", strategy="ffa", engine="simulation"))
    assert res["engine"] == "simulation" and [h["round"] for h in res["history"]] == [1, 2]
    digests = [d for h in res["history"] for d in h["frozen_digests"]]
    assert len(digests) == 4 and len(set(digests)) == 1  # A identical across clients and rounds
    b_numel = res["sent_numel"]
    for h in res["history"]:
        assert h["replies"] == 2 and h["failed"] == 0
        assert h["bytes_up"] == 2 * 4 * b_numel  # two clients, B only, fp32
        assert h["agg_error"] == 0.0
    assert res["history"][0]["bytes_down"] == 2 * 4 * (b_numel + res["frozen_numel"])  # A goes down once
    assert res["history"][1]["bytes_down"] == 2 * 4 * b_numel
    assert set(res["eval"]) == {"0", "1", "2"} and all(0 <= e["accuracy"] <= 1 for e in res["eval"].values())
    saved = json.loads((tmp_path / "sim" / "federated.json").read_text())
    assert saved["history"] == json.loads(json.dumps(res["history"]))
    from lorakit.io import read_adapter_config

    assert read_adapter_config(res["adapter_dir"])["peft_type"] == "LORA"


def test_deployment_engine_two_rounds_over_loopback(tiny_lm_dir, cls_data, tmp_path):
    before = _flower_processes()
    base = fed_base(tiny_lm_dir, cls_data, tmp_path / "dep", strategy="fair", engine="deployment",
                    fair_solver="frobenius", timeout_s=600)
    res = federate(base=base, timeout_s=900)
    assert res["engine"] == "deployment" and [h["round"] for h in res["history"]] == [1, 2]
    for h in res["history"]:
        assert h["replies"] == 2 and h["failed"] == 0
        assert h["fair_objective_after"] <= h["fair_objective_before"] + 1e-9
    logs = sorted(p.name for p in (tmp_path / "dep" / "deployment").glob("*.log"))
    assert logs == ["flwr-run.log", "superlink.log", "supernode-0.log", "supernode-1.log"]
    # the final global adapter is a PEFT LoRA file that PEFT loads
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(res["adapter_dir"], "adapter_model.safetensors"))
    assert any("lora_B" in k for k in tensors)
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    m = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), res["adapter_dir"])
    sd = {k.replace(".default", ""): v for k, v in m.state_dict().items() if "lora_" in k}
    assert set(sd) == set(tensors) and all(torch.equal(sd[k], tensors[k]) for k in tensors)
    assert _flower_processes() <= before  # SuperLink, SuperNodes and their apps are gone
