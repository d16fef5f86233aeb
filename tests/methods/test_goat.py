"""GOAT against the released code (Facico/GOAT-PEFT ``goat/peta/src/goat/layer.py`` ``GOATLayer.update_layer``, as
run by ``math.sh``: ``--lora src.goat`` i.e. ``init_type="goat"``, ``init_cof = 1/E``): the SVD init and the
scale, written out here from that code."""
import math

import torch

import lorakit
from _moe import attached, x
from conftest import MLP


def released_goat_init(W, r, E, scaling, rho=10.0):
    """``svd_init`` of the released code for ``init_type="goat"``: per-expert products ``B_i A_i`` and the residual."""
    V, S, Uh = torch.linalg.svd(W.float(), full_matrices=False)  # the code's names: W = V diag(S) Uh
    Vlen, Mlen = V.shape[-1] // E, r // E
    pieces = [range(i * Vlen, i * Vlen + Mlen) for i in range(E)]
    idx = [j for p in pieces for j in p]
    Sr = S[idx] / (scaling * rho)
    lora_A = torch.diag(torch.sqrt(Sr)) @ Uh[idx]
    lora_B = V[:, idx] @ torch.diag(torch.sqrt(Sr))
    prods = [lora_B[:, i * Mlen:(i + 1) * Mlen] @ lora_A[i * Mlen:(i + 1) * Mlen] for i in range(E)]
    return prods, W - (1.0 / E) * scaling * lora_B @ lora_A, [list(p) for p in pieces]


def _check(m, w0, r, E, s):
    a = dict(lorakit.adapters(m))["lin0"]
    assert math.isclose(a.expert_scale(), s, rel_tol=1e-12)
    prods, W_res, pieces = released_goat_init(w0, r, E, s)
    for i in range(E):
        torch.testing.assert_close(a.experts_B[i] @ a.experts_A[i], prods[i], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.lin0.base_layer.weight, W_res, rtol=1e-4, atol=1e-5)
    assert [list(p) for p in a.segments(12)] == pieces


def test_default_is_the_released_lora_alpha_over_r_scale():
    torch.manual_seed(0)
    w0 = MLP().lin0.weight.detach().clone()
    m = attached("goat", r=4, num_experts=2, top_k=2, alpha=16.0)
    _check(m, w0, 4, 2, 16.0 / 2)  # update_layer: scaling = lora_alpha / rank_list[i], rank_list[i] = r // E


def test_theoretical_scale_is_an_option():
    torch.manual_seed(0)
    w0 = MLP().lin0.weight.detach().clone()
    m = attached("goat", r=4, num_experts=2, top_k=2, scaling="goat")
    _check(m, w0, 4, 2, math.sqrt(3 * 1.0 * 12 / 2))  # "scale" init types: √(3·η·in_features / rank_list[i])


def test_uniform_full_routing_preserves_output():
    torch.manual_seed(0)
    ref = MLP()(x()).detach()
    m = attached("goat", r=4, num_experts=2, top_k=2)
    for _, ad in lorakit.adapters(m):  # uniform router, top_k = E, c = 1/E -> output == base
        with torch.no_grad():
            ad.router.weight.zero_()
    torch.testing.assert_close(m.eval()(x()), ref, rtol=1e-4, atol=1e-4)


def test_goat_mini_takes_last_components():
    m = attached("goat", r=4, num_experts=2, init="goat_mini")
    # released init_type="goat_mini": pieces [(i+1)·Vlen − Mlen, (i+1)·Vlen)
    assert [list(r) for r in dict(lorakit.adapters(m))["lin0"].segments(12)] == [[4, 5], [10, 11]]
