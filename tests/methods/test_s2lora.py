"""S2-LoRA mechanism (arXiv:2309.11756): one trainable (A, B) per shape group, a per-matrix rank vector λ_ℓ,
ΔW_ℓ = s·B·diag(λ_ℓ)·A, an L1 penalty on λ; checked against the formula written here."""
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit


class Net(nn.Module):  # two 16x16 matrices (one group) and one 16x12 (its own group)
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 16)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _attach(l1=0.01, r=3):
    torch.manual_seed(0)
    m = Net()
    lorakit.attach(m, {"method": "s2lora", "targets": ["a", "b", "c"], "r": r, "alpha": 6, "l1": l1})
    return m


def test_groups_share_one_pair_and_count():
    m = _attach()
    ad = dict(lorakit.adapters(m))
    Ab, Bb = ad["b"]._pair()
    Ac, Bc = ad["c"]._pair()
    assert Ab is Ac and Bb is Bc  # same shape: one pair
    assert ad["a"]._pair()[0] is not Ab
    n = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert n == 3 * (12 + 16) + 3 * (16 + 16) + 3 * 3  # r(m+n) per group + L·r
    x = torch.randn(4, 12)
    base = Net()
    base.load_state_dict({k.replace("base_layer.", ""): v for k, v in m.state_dict().items() if "adapters" not in k},
                         strict=False)
    assert torch.allclose(m(x), base(x), atol=1e-6)  # λ = 0: the base model


def test_delta_formula_and_lowrank():
    m = _attach()
    ad = dict(lorakit.adapters(m))
    with torch.no_grad():
        for a in ad.values():
            a.s2_lambda.normal_()
    for name, a in ad.items():
        A, B = a._pair()
        ref = (6 / 3) * B @ torch.diag(a.s2_lambda) @ A
        assert torch.allclose(a.delta_weight(), ref, atol=1e-6)
        x = torch.randn(5, A.shape[1])
        assert torch.allclose(a.delta(x), x @ ref.T, atol=1e-5)
        lr = a.lowrank()
        assert torch.allclose(lr.scale * lr.B @ lr.A, ref, atol=1e-6)


def test_l1_penalty_and_shared_gradient():
    m = _attach(l1=0.5)
    ad = dict(lorakit.adapters(m))
    with torch.no_grad():
        for a in ad.values():
            a.s2_lambda.uniform_(-1, 1)
    expected = 0.5 * sum(a.s2_lambda.abs().sum() for a in ad.values())
    assert torch.allclose(lorakit.extra_loss(m), expected)
    # the shared A receives the gradient of both matrices of its group
    x = torch.randn(3, 12)
    m(x).sum().backward()
    g_both = ad["b"]._pair()[0].grad.clone()
    m.zero_grad()
    with torch.no_grad():
        ad["c"].s2_lambda.zero_()
    m(x).sum().backward()
    assert not torch.allclose(ad["b"]._pair()[0].grad, g_both)


def test_file_holds_each_pair_once_and_round_trips(tmp_path):
    m = _attach()
    with torch.no_grad():
        for _, a in lorakit.adapters(m):
            a.s2_lambda.normal_()
    x = torch.randn(2, 12)
    y = m(x)
    lorakit.save_adapter(m, tmp_path / "ad")
    keys = load_file(str(tmp_path / "ad" / "adapter_model.safetensors")).keys()
    assert sum("s2_A" in k for k in keys) == 2 and sum("s2_lambda" in k for k in keys) == 3
    torch.manual_seed(5)
    fresh = Net()
    fresh.load_state_dict({k.replace("base_layer.", ""): v for k, v in m.state_dict().items()
                           if "adapters" not in k}, strict=False)
    lorakit.load_adapter(fresh, tmp_path / "ad")
    assert torch.allclose(fresh(x), y, atol=1e-6)
    merged = lorakit.merge_and_unload(fresh)
    assert torch.allclose(merged(x), y, atol=1e-5)
