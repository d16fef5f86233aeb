"""GaLore and Fira (lorakit.procedures.galore): the oracle (galore-torch), the projected state, Fira's mechanism."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lorakit.procedures import make_procedure
from lorakit.procedures.base import Hyper, TrainParam


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    tall = nn.Parameter(torch.randn(24, 16, generator=g))  # m >= n: right projector
    wide = nn.Parameter(torch.randn(12, 20, generator=g))  # m < n: left projector
    vec = nn.Parameter(torch.randn(16, generator=g))  # not projected
    return [TrainParam("tall.weight", tall, "weight", kind="linear"), TrainParam("wide.weight", wide, "weight",
                                                                                   kind="linear"),
            TrainParam("norm.weight", vec, "weight")]


def _grads(step, shapes, seed=1):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return [torch.randn(s, generator=g) for s in shapes]


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_galore_matches_galore_torch_over_a_projector_refresh(wd):
    galore_torch = pytest.importorskip("galore_torch")
    hp = Hyper(lr=1e-2, weight_decay=wd, betas=(0.9, 0.999), eps=1e-6)
    proc = make_procedure("galore", {"rank": 4, "update_proj_gap": 3, "scale": 0.25}, hp)
    mine = _params()
    opt = proc.build_optimizer(mine)
    theirs = [nn.Parameter(t.param.detach().clone()) for t in mine]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = galore_torch.GaLoreAdamW([
            {"params": theirs[:2], "rank": 4, "update_proj_gap": 3, "scale": 0.25, "proj_type": "std",
             "weight_decay": wd},
            {"params": theirs[2:], "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.999), eps=1e-6)
    shapes = [t.param.shape for t in mine]
    for step in range(7):  # projector refreshed at steps 0, 3, 6
        for p, q, g in zip([t.param for t in mine], theirs, _grads(step, shapes)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for p, q in zip([t.param for t in mine], theirs):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # the state is low-rank: tall (24x16) right projector -> moments (24, 4); wide (12x20) left -> (4, 20)
    st = opt.state[mine[0].param]
    assert st["exp_avg"].shape == (24, 4) and st["exp_avg_sq"].shape == (24, 4) and st["projector"].shape == (4, 16)
    st = opt.state[mine[1].param]
    assert st["exp_avg"].shape == (4, 20) and st["projector"].shape == (12, 4)
    assert opt.state[mine[2].param]["exp_avg"].shape == (16,)


def test_galore_update_is_the_projected_adam_update_first_step():
    """Written from the paper: step 1 of Adam on R = G Pᵀ is N = R/(|R|+eps) (bias-corrected), ΔW = -lr·α·N P."""
    hp = Hyper(lr=0.1, eps=1e-8)
    proc = make_procedure("galore", {"rank": 3, "update_proj_gap": 10, "scale": 2.0}, hp)
    t = _params()[0]
    W0 = t.param.detach().clone()
    opt = proc.build_optimizer([t])
    G = torch.randn(24, 16)
    t.param.grad = G.clone()
    opt.step()
    U, S, Vh = torch.linalg.svd(G.double())
    P = Vh[:3]  # right singular vectors (m >= n)
    R = G.double() @ P.T
    N = R / (R.abs() + 1e-8)  # m̂ = R, v̂ = R² after one bias-corrected step
    want = W0.double() - 0.1 * 2.0 * N @ P
    torch.testing.assert_close(t.param.double(), want, rtol=1e-4, atol=1e-5)
    # the update lies in the row space of P: rank(ΔW) <= r
    assert torch.linalg.matrix_rank((t.param - W0).double(), atol=1e-6) <= 3


def test_fira_residual_is_zero_at_full_rank_and_equals_galore():
    # rank = min(m, n) = 16 for the 24x16 matrix: the procedures do not project such a matrix (min side <= rank),
    # so the optimiser is driven directly with a full-rank group
    from lorakit.procedures.galore import ProjectedAdamW

    a = _params()
    p1, p2 = nn.Parameter(a[0].param.detach().clone()), nn.Parameter(a[0].param.detach().clone())
    base = dict(rank=16, update_proj_gap=2, scale=1.0, proj_type="std")
    o1 = ProjectedAdamW([{"params": [p1], **base}], lr=1e-2, eps=1e-6)
    o2 = ProjectedAdamW([{"params": [p2], **base, "fira_limiter": 1.01}], lr=1e-2, eps=1e-6)
    for step in range(4):
        g = _grads(step, [p1.shape])[0]
        p1.grad, p2.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
        torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6)
    assert float(o2.state[p2]["fira_norm"]) < 1e-4  # the residual G - P Pᵀ G vanishes at full rank


def test_fira_scaling_factor_and_limiter_follow_the_formula():
    from lorakit.procedures.galore import ProjectedAdamW

    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(20, 8))  # right projector, rank 3
    opt = ProjectedAdamW([{"params": [p], "rank": 3, "update_proj_gap": 100, "scale": 0.5, "proj_type": "std",
                           "fira_limiter": 1.01}], lr=0.1, betas=(0.9, 0.999), eps=1e-8)
    norms = []
    for step in range(3):
        W0 = p.detach().clone().double()
        G = torch.randn(20, 8) * (1 + 5 * step)  # growing gradients: the limiter must act
        p.grad = G.clone()
        opt.step()
        st = opt.state[p]
        P, m, v = st["projector"].double(), st["exp_avg"].double(), st["exp_avg_sq"].double()
        t = step + 1
        R = G.double() @ P.T
        N = m / (v.sqrt() + 1e-8)
        phi = N.norm(dim=1) / (R.norm(dim=1) + 1e-8)  # one factor per row (m >= n)
        S = (G.double() - 0.5 * R @ P) * phi[:, None]
        if norms:
            S = S / max(float(S.norm()) / (norms[-1] + 1e-8), 1.01) * 1.01
        norms.append(float(S.norm()))
        step_size = 0.1 * (1 - 0.999 ** t) ** 0.5 / (1 - 0.9 ** t)
        want = W0 - step_size * (0.5 * N @ P + S)
        torch.testing.assert_close(p.double(), want, rtol=1e-4, atol=1e-5)
        assert abs(float(st["fira_norm"]) - norms[-1]) <= 1e-4 * norms[-1]
    assert norms[2] <= 1.01 * norms[1] * (1 + 1e-5) and norms[1] <= 1.01 * norms[0] * (1 + 1e-5)


def test_galore_refuses_when_nothing_is_projected_and_bad_options():
    from lorakit.errors import ConfigError

    with pytest.raises(ConfigError, match="rank"):
        make_procedure("galore", {"rank": 0})
    with pytest.raises(ConfigError, match="nothing would be projected"):
        make_procedure("galore", {"rank": 64}).check(_params())


def test_gradnormlorp_weight_norm_gradients_and_one_step():
    """Written from the paper: W = m ⊙ V, g_m = Σ_j V_ij G_ij, g_V = G − V ⊙ g_m, direction projected (GaLore)."""
    from lorakit.procedures.gradnormlorp import weight_norm_gradients

    torch.manual_seed(0)
    W, G = torch.randn(20, 12, dtype=torch.float64), torch.randn(20, 12, dtype=torch.float64)
    m, V, g_m, g_V = weight_norm_gradients(W, G)
    torch.testing.assert_close(m[:, None] * V, W)  # reconstructs W
    torch.testing.assert_close(V.norm(dim=1), torch.ones(20, dtype=torch.float64))
    torch.testing.assert_close(g_m, torch.einsum("ij,ij->i", V, G))
    assert float((g_V * V).sum(1).abs().max()) < 1e-10  # tangential
    hp = Hyper(lr=0.05, eps=1e-8)
    proc = make_procedure("gradnormlorp", {"rank": 3, "update_proj_gap": 5, "scale": 0.5}, hp)
    t = TrainParam("q.weight", nn.Parameter(W.float().clone()), "weight", kind="linear")
    opt = proc.build_optimizer([t])
    t.param.grad = G.float().clone()
    opt.step()
    U, S, Vh = torch.linalg.svd(g_V)
    P = Vh[:3]  # 20 >= 12: right projector of the direction gradient
    R = g_V @ P.T
    V1 = V - 0.05 * 0.5 * (R / (R.abs() + 1e-8)) @ P  # first Adam step: m̂/√v̂ = sign
    m1 = m - 0.05 * g_m / (g_m.abs() + 1e-8)
    torch.testing.assert_close(t.param.double(), m1[:, None] * V1, rtol=1e-4, atol=1e-5)
    st = opt.state[t.param]
    assert st["exp_avg"].shape == (20, 3) and st["mag_avg"].shape == (20,)
