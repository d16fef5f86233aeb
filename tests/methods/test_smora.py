import torch

import lorakit
from _moe import attached, fill, x


def test_full_activation_with_constant_router_is_plain_lora():
    m = attached("smora", r=4, activate_r=4, alpha=8.0)
    fill(m)
    a = dict(lorakit.adapters(m))["lin0"]
    with torch.no_grad():
        a.router.weight.zero_()
        xi = x()
        ref = xi @ a.experts_A[:, 0, :].t() @ a.experts_B[:, :, 0] * (8.0 / 4)
        torch.testing.assert_close(a.delta(xi), ref, rtol=1e-5, atol=1e-5)


def test_topk_ranks_and_bias_moves_by_u():
    m = attached("smora", r=4, activate_r=2, bias_lr=1e-3)
    fill(m)
    m.train()
    m(x())
    a = dict(lorakit.adapters(m))["lin0"]
    assert ((a._weights > 0).sum(-1) == 2).all()
    cnt = a._count.clone()
    from lorakit.inject import controllers  # lorakit.controllers is shadowed by the submodule (core issue)

    (ctrl,) = controllers(m)
    ctrl.step(1, m, None)
    torch.testing.assert_close(a.route_bias, 1e-3 * torch.sign(cnt.mean() - cnt))
    assert a._count.sum() == 0 and "route_bias" in a.state_dict()


def official_srmole_delta(x, A, B, W_router, bias, k, p, alpha):
    """``SRMoLELinear.forward`` (StyxXuan/smora ``packages/peft/src/peft/tuners/srmole/layer.py``), dense path, on an
    already-dropped input: sigmoid router, repeat_interleave, + bias, topk, gates = selected / sum · activate_r."""
    logits = torch.sigmoid(x @ W_router.t()).repeat_interleave(p, dim=-1) + bias
    top, idx = logits.topk(k, dim=-1)
    sparse = torch.zeros_like(logits).scatter(-1, idx, top)
    gates = sparse / sparse.sum(-1, keepdim=True) * k
    mid = torch.einsum("rj,ij->ir", A, x.reshape(-1, x.shape[-1]))
    out = torch.einsum("ir,jr,ir->ij", mid, B, gates.reshape(-1, gates.shape[-1]))
    return out.reshape(*x.shape[:-1], -1) * (alpha / k), gates


def test_gate_normalisation_matches_the_authors_code():
    m = attached("smora", r=8, activate_r=3, rank_partition=2, alpha=6.0)
    fill(m, std=0.5)
    a = dict(lorakit.adapters(m))["lin0"]
    with torch.no_grad():
        a.route_bias.copy_(torch.linspace(-0.2, 0.3, 8))  # the bias enters the gate values, not only the choice
        xi = x()
        ref, gates = official_srmole_delta(xi, a.experts_A[:, 0, :], a.experts_B[:, :, 0].t(),
                                           a.router.weight, a.route_bias, 3, 2, 6.0)
        torch.testing.assert_close(a.delta(xi), ref, rtol=1e-5, atol=1e-6)
        m.train()
        a.dropout = torch.nn.Identity()
        a.delta(xi)
        torch.testing.assert_close(a._weights.reshape(-1, 8), gates.reshape(-1, 8), rtol=1e-5, atol=1e-6)
        assert torch.allclose(gates.sum(-1), torch.full(gates.shape[:-1], 3.0))  # Σ g = activate_r


def test_router_sees_the_dropped_input():
    m = attached("smora", r=4, activate_r=2, alpha=4.0, dropout=0.5)
    fill(m, std=0.5)
    a = dict(lorakit.adapters(m))["lin0"]
    m.train()
    xi = x()
    with torch.no_grad():
        torch.manual_seed(7)
        out = a.delta(xi)
        torch.manual_seed(7)
        xd = torch.nn.functional.dropout(xi, 0.5, training=True)  # the same mask as the adapter's dropout
        ref, _ = official_srmole_delta(xd, a.experts_A[:, 0, :], a.experts_B[:, :, 0].t(), a.router.weight,
                                       a.route_bias, 2, 1, 4.0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
