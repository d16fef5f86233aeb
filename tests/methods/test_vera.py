"""VeRA mechanism: only the vectors train, the bases are one storage shared by all layers, sized to the largest
target, ΔW = diag(λ_b) B diag(λ_d) A, and PEFT's seeded bases are reproduced bit-exactly."""
import pytest
import torch

import lorakit
from conftest import MLP, run


def _attach(**kw):
    torch.manual_seed(0)
    m = MLP()
    lorakit.attach(m, {"method": "vera", "targets": ["lin0", "lin1", "out"], "r": 4, **kw})
    return m


def test_only_vectors_train_and_bases_shared():
    m = _attach()
    ads = [a for _, a in lorakit.adapters(m)]
    train = {n.rsplit(".", 1)[-1] for n, p in m.named_parameters() if p.requires_grad}
    assert train == {"vera_lambda_b", "vera_lambda_d"}
    ptrs = {a.bases.A.data_ptr() for a in ads}
    assert len(ptrs) == 1 and len({a.bases.B.data_ptr() for a in ads}) == 1
    assert ads[0].bases.A.shape == (4, 16) and ads[0].bases.B.shape == (16, 4)  # max d_in=16 (lin1), d_out=16
    m.to(torch.float64)  # conversion keeps one storage
    assert len({a.bases.A.data_ptr() for _, a in lorakit.adapters(m)}) == 1
    assert all(a.vera_lambda_b.abs().sum() == 0 for a in ads)


def test_delta_weight_formula():
    m = _attach()
    a = dict(lorakit.adapters(m))["lin0"]
    with torch.no_grad():
        a.vera_lambda_b.normal_()
        a.vera_lambda_d.normal_()
    A, B = a.bases.A[:, :12], a.bases.B[:16]
    ref = torch.diag(a.vera_lambda_b) @ B @ torch.diag(a.vera_lambda_d) @ A
    assert torch.allclose(a.delta_weight(), ref, atol=1e-6)
    x = torch.randn(3, 12)
    assert torch.allclose(a.delta(x), x @ ref.T, atol=1e-5)


@pytest.mark.parametrize("save_projection", [False, True])
def test_bases_match_peft_generator(save_projection, tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    pm = peft.get_peft_model(MLP(), peft.VeraConfig(r=4, target_modules=["lin0", "lin1", "out"],
                                                    projection_prng_key=7, save_projection=save_projection))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "vera_lambda" in n:
                p.normal_()
    m = _attach(projection_seed=7)
    a = next(a for _, a in lorakit.adapters(m))
    assert torch.equal(a.bases.A, pm.base_model.vera_A["default"])
    assert torch.equal(a.bases.B, pm.base_model.vera_B["default"])
    pm.save_pretrained(str(tmp_path))
    fresh = MLP()
    fresh.load_state_dict(_base_sd(pm))
    lorakit.load_adapter(fresh, tmp_path)
    x = torch.randn(5, 12)
    assert torch.allclose(run(fresh, x), pm(x), atol=1e-5)


def _base_sd(pm):
    return {k.replace(".base_layer", ""): v for k, v in pm.get_base_model().state_dict().items()
            if "vera_" not in k}
