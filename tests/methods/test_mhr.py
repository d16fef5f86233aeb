import pytest
import torch

import lorakit
from conftest import tiny_llama
from _moe import attached, fill, x


def test_routing_weights_normalised_and_mu_is_skill_average():
    m = attached("mhr", r=2, n_tasks=3, n_skills=3, n_splits=2, mode="mu")
    fill(m)
    a = dict(lorakit.adapters(m))["lin0"]
    xi = x()
    with torch.no_grad():
        A = a.poly_lora_A.mean(1).reshape(12, 2)  # (splits, d/h, r) -> (d_in, r)
        B = a.poly_lora_B.mean(1).transpose(0, 1).reshape(2, 16)
        torch.testing.assert_close(a.delta(xi), xi @ A @ B / 2, rtol=1e-5, atol=1e-5)
    m2 = attached("mhr", r=2, n_tasks=3, n_skills=3, n_splits=2)
    fill(m2)
    a2 = dict(lorakit.adapters(m2))["lin0"]
    w = a2.weights(xi)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(6, 2))


def test_parity_with_peft_poly():
    peft = pytest.importorskip("peft")
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([1, 0])
    model = tiny_llama()
    lorakit.attach(model, {"method": "mhr", "targets": ["q_proj", "v_proj"], "r": 2, "n_tasks": 2, "n_skills": 3,
                           "n_splits": 2})
    fill(model)
    model.eval()
    with lorakit.batch_context(model, task_ids=t):
        ours = model(ids).logits
    cfg = peft.PolyConfig(r=2, n_tasks=2, n_skills=3, n_splits=2, target_modules=["q_proj", "v_proj"])
    pm = peft.get_peft_model(tiny_llama(), cfg).eval()
    sd = {}
    for path, a in lorakit.adapters(model):
        for k, v in a.state_dict().items():
            parts = k.split(".")
            key = f"base_model.model.{path}.{parts[0]}.default" + ("." + ".".join(parts[1:]) if len(parts) > 1 else "")
            sd[key] = v
    missing = pm.load_state_dict(sd, strict=False)
    assert not missing.unexpected_keys
    theirs = pm.base_model(input_ids=ids, task_ids=t).logits  # PolyModel.forward takes task_ids
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
