"""RandLoRA mechanism: the update is full rank although every basis is rank r; only λ, γ train; the shared bases
are PEFT's (seeded, bf16, std-normalised) bit-exactly."""
import pytest
import torch

import lorakit
from conftest import MLP, run


def _attach(**kw):
    torch.manual_seed(0)
    m = MLP()
    lorakit.attach(m, {"method": "randlora", "targets": ["lin0", "lin1", "out"], "r": 3, "alpha": 6.0, **kw})
    return m


@pytest.mark.parametrize("sparse", [False, True])
def test_update_is_full_rank(sparse):
    m = _attach(sparse=sparse)
    for path, a in lorakit.adapters(m):
        assert a.delta_weight().abs().max() == 0  # λ = 0 at init
        with torch.no_grad():
            a.randlora_lambda.normal_()
            a.randlora_gamma.normal_()
        dw = a.delta_weight().double()
        assert dw.shape == (a.view.d_out, a.view.d_in)
        rank = torch.linalg.matrix_rank(dw)
        if sparse:  # ±1/0 bases at tiny r can have all-zero columns of the unique base A: still rank > r
            assert rank > 3, path
        else:
            assert rank == min(dw.shape) > 3, path  # rank r=3 bases, full-rank sum
        x = torch.randn(4, a.view.d_in)
        assert torch.allclose(a.delta(x), x @ dw.float().T, atol=1e-4)
    train = {n.rsplit(".", 1)[-1] for n, p in m.named_parameters() if p.requires_grad}
    assert train == {"randlora_lambda", "randlora_gamma"}
    assert len({a.bases.B.data_ptr() for _, a in lorakit.adapters(m)}) == 1


@pytest.mark.parametrize("kw", [{"save_projection": False}, {"very_sparse": True}])
def test_matches_peft(kw, tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    pm = peft.get_peft_model(MLP(), peft.RandLoraConfig(r=3, randlora_alpha=6, projection_prng_key=5,
                                                        target_modules=["lin0", "lin1", "out"], **kw))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "randlora_" in n:
                p.normal_()
    m = _attach(projection_seed=5, **kw)
    a = next(a for _, a in lorakit.adapters(m))
    assert torch.equal(a.bases.A, pm.base_model.randlora_A["default"].float())
    assert torch.equal(a.bases.B, pm.base_model.randlora_B["default"].float())
    pm.save_pretrained(str(tmp_path))
    fresh = MLP()
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in pm.get_base_model().state_dict().items()
                           if "randlora_" not in k})
    lorakit.load_adapter(fresh, tmp_path)
    x = torch.randn(5, 12)
    assert torch.allclose(run(fresh, x), pm(x), atol=1e-5)
