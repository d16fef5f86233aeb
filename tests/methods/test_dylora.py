import torch

import lorakit
from lorakit.rank import truncate
from conftest import MLP
from _drive import train


def _model(**kw):
    torch.manual_seed(0)
    m = MLP()
    lorakit.attach(m, {"method": "dylora", "targets": ["lin0", "lin1"], "r": 4, "alpha": 8, "seed": 0, **kw})
    with torch.no_grad():
        for _, a in lorakit.adapters(m):
            a.lora_B.weight.normal_()
    return m.eval()


def _reference(m, x, b):
    """The rank-b slice computation: W0 x + (α/b) B[:, :b] A[:b] x, written out."""
    lin0, lin1 = m.lin0, m.lin1
    def lay(h, l):
        a = l.adapters["default"]
        return l.base_layer(h) + (h @ a.lora_A.weight[:b].t() @ a.lora_B.weight[:, :b].t()) * (8 / b)
    h = torch.relu(lay(x, lin0))
    return m.out(torch.relu(lay(h, lin1)))


def test_truncation_equals_rank_b_slice(tmp_path):
    x = torch.randn(5, 12)
    for b in (1, 2, 4):
        m = _model()
        ref = _reference(m, x, b).detach()
        m2 = _model(eval_rank=b)
        assert torch.allclose(m2(x), ref, atol=1e-6)  # eval at a configured rank
        truncate(m, b)
        assert all(a.lora_A.weight.shape[0] == b for _, a in lorakit.adapters(m))
        assert torch.allclose(m(x), ref, atol=1e-6)
        with lorakit.merged(m):
            assert torch.allclose(m(x), ref, atol=1e-5)
        lorakit.save_adapter(m, tmp_path / f"b{b}")
        fresh = MLP()
        fresh.load_state_dict({k.replace("base_layer.", ""): v for k, v in m.state_dict().items() if "adapters" not in k})
        lorakit.load_adapter(fresh, tmp_path / f"b{b}")
        assert torch.allclose(fresh.eval()(x), ref, atol=1e-6)


def test_sampling_is_seeded_and_per_step():
    x = torch.randn(5, 12)
    seen = []
    for _ in range(2):
        m = _model()
        ranks = []
        train(m, x, 12, hook=lambda s, c: ranks.append(tuple(a.b for _, a in lorakit.adapters(m))))
        seen.append(ranks)
        assert all(len(set(r)) == 1 and 1 <= r[0] <= 4 for r in ranks)  # one b per step for every module
    assert seen[0] == seen[1] and len({r[0] for r in seen[0]}) > 1


def test_frozen_mode_trains_only_component_b():
    m = _model(frozen_lower=True).train()
    for _, a in lorakit.adapters(m):
        a.b = 3
    m(torch.randn(5, 12)).pow(2).sum().backward()
    for _, a in lorakit.adapters(m):
        g = a.lora_B.weight.grad
        assert g[:, :2].abs().sum() == 0 and g[:, 3:].abs().sum() == 0 and g[:, 2].abs().sum() > 0
