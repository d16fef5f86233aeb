"""The papers' composition methods on tiny models: LoRA-LEGO (C1), Twin-Merging (C2), aTLAS (C3)."""
from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.errors import ConfigError
from lorakit.inject import adapters as adapters_of
from lorakit.merging.atlas import ATLAS
from lorakit.merging.lego import kmeans, lego_merge
from lorakit.merging.twin import twin_merge

from conftest import MLP, tiny_llama


def _randomise(m, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, a in adapters_of(m, name):
            for p in a.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _mlp(specs):
    torch.manual_seed(0)
    m = MLP().eval()
    for i, (n, r) in enumerate(specs):
        lorakit.attach(m, {"method": "lora", "r": r, "alpha": 2 * r, "targets": ["lin0", "lin1"], "seed": i}, n)
        _randomise(m, n, 50 + i)
    return m


def _dw(m, name):
    return {p: a.delta_weight().detach() for p, a in adapters_of(m, name)}


# ------------------------------------------------------------------------------------------------ LoRA-LEGO
def test_lego_with_k_total_rank_and_no_rescaling_is_cat():
    m = _mlp([("a", 2), ("b", 3)])
    lorakit.combine(m, ["a", "b"], [0.5, 1.5], method="lego", rank=5, name="lego",
                    lego_options={"reweight": False})
    lorakit.combine(m, ["a", "b"], [0.5, 1.5], method="cat", name="cat")
    for p, d in _dw(m, "cat").items():
        torch.testing.assert_close(_dw(m, "lego")[p], d, atol=1e-5, rtol=1e-5)


def test_lego_merges_duplicate_units_into_one_and_rescales_to_member_norm():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g)
    # the same LoRA twice: k = 2 clusters pair each unit with its copy; the centroid is the unit itself
    a2, b2 = lego_merge([(A, B), (A, B)], [1.0, 1.0], k=2)
    torch.testing.assert_close(b2 @ a2, B @ A, atol=1e-5, rtol=1e-5)
    # two opposite-scaled copies of one unit (b, a) and (2b, a/2) are the same MSU after canonicalisation
    a1, b1 = lego_merge([(A[:1], B[:, :1]), (A[:1] / 2, B[:, :1] * 2)], [1.0, 1.0], k=1)
    torch.testing.assert_close(b1 @ a1, B[:, :1] @ A[:1], atol=1e-5, rtol=1e-5)


def test_lego_parameter_reweighting_restores_the_member_norm():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    a_m, b_m = lego_merge([(a, b)], [1.0], k=1, canonicalize=False)  # two orthogonal units in one cluster
    assert abs(float(a_m.norm()) - 1.0) < 1e-6 and abs(float(b_m.norm()) - 1.0) < 1e-6  # mean would be 1/sqrt2
    a_n, _ = lego_merge([(a, b)], [1.0], k=1, canonicalize=False, reweight=False)
    assert abs(float(a_n.norm()) - 2 ** -0.5) < 1e-6


def test_kmeans_separates_clear_clusters_and_checks_k():
    x = torch.cat([torch.randn(5, 3) * 0.01, torch.randn(5, 3) * 0.01 + 10])
    lab = kmeans(x, 2)
    assert len(set(lab[:5].tolist())) == 1 and len(set(lab[5:].tolist())) == 1 and lab[0] != lab[5]
    with pytest.raises(ConfigError, match="k=11"):
        kmeans(x, 11)


# ------------------------------------------------------------------------------------------------ Twin-Merging
def _llama_with_tasks():
    m = tiny_llama(layers=1)
    for i, n in enumerate(["t0", "t1"]):
        lorakit.attach(m, {"method": "lora", "r": 2, "alpha": 4, "targets": ["q_proj", "v_proj"], "seed": i}, n)
        _randomise(m, n, 80 + i)
    return m


def test_twin_one_hot_router_is_shared_plus_exclusive_and_full_rank_is_the_task():
    m = _llama_with_tasks()
    ids = torch.randint(0, 64, (3, 6))
    outs = {}
    for n in ("t0", "t1"):
        lorakit.set_active(m, [n])
        outs[n] = m(input_ids=ids).logits
    tw = twin_merge(m, ["t0", "t1"], lam=0.3, rank="full")
    shared = m(input_ids=ids).logits  # the model alone: the shared expert only
    for t, n in enumerate(("t0", "t1")):
        with tw.route([1.0 if j == t else 0.0 for j in range(2)]):
            torch.testing.assert_close(tw(input_ids=ids).logits, outs[n], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(shared, outs["t0"], atol=1e-4)
    # the shared expert is task arithmetic with lambda
    lorakit.combine(m, ["t0", "t1"], [0.3, 0.3], method="cat", name="ta", active=False)
    for p, d in _dw(m, "ta").items():
        torch.testing.assert_close(_dw(m, "twin")[p], d, atol=1e-6, rtol=1e-6)


def test_twin_compressed_exclusive_and_a_trained_router_routes_per_input():
    m = _llama_with_tasks()
    tw = twin_merge(m, ["t0", "t1"], lam=0.5, rank=1, router_hidden=16)
    # exclusive parts are rank 1 per task and module
    for fs in tw.exclusive.values():
        assert all(A.shape[0] == 1 for _, A, _ in fs)
    # inputs of task 0 use tokens < 32, task 1 tokens >= 32: the router learns to tell them apart
    g = torch.Generator().manual_seed(0)
    b0 = torch.randint(0, 32, (16, 6), generator=g)
    b1 = torch.randint(32, 64, (16, 6), generator=g)
    tw.fit_router([({"input_ids": b0}, torch.zeros(16)), ({"input_ids": b1}, torch.ones(16))], epochs=60, lr=1e-2)
    w = tw.omega(torch.cat([b0[:4], b1[:4]]))
    assert bool((w[:4, 0] > 0.9).all()) and bool((w[4:, 1] > 0.9).all())
    torch.testing.assert_close(w.sum(1), torch.ones(8))
    # per-sample mixing: a mixed batch gives each row what it gives alone
    mixed = tw(input_ids=torch.cat([b0[:2], b1[:2]])).logits
    torch.testing.assert_close(mixed[:2], tw(input_ids=b0[:2]).logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[2:], tw(input_ids=b1[:2]).logits, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ aTLAS
def test_atlas_fixed_coefficients_are_task_arithmetic_and_only_coefficients_train():
    m = _llama_with_tasks()
    ids = torch.randint(0, 64, (2, 5))
    lorakit.combine(m, ["t0", "t1"], [0.7, -0.4], method="linear", name="ta")
    want = m(input_ids=ids).logits
    lorakit.detach(m, "ta")
    at = ATLAS(m, ["t0", "t1"], init=[0.7, -0.4])
    assert at.lam.shape == (2, 2)  # T x B (q_proj, v_proj of one layer)
    torch.testing.assert_close(at(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    # lambda = 0 is the base model
    with torch.no_grad():
        at.lam.zero_()
    with lorakit.disabled(m):
        base = m(input_ids=ids).logits
    torch.testing.assert_close(at(input_ids=ids).logits, base, atol=1e-6, rtol=1e-6)
    trainable = [n for n, p in at.named_parameters() if p.requires_grad]
    assert trainable == ["lam"]
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    batch = {"input_ids": ids, "labels": ids}
    losses = at.fit([batch], steps=15, lr=0.05)
    assert losses[-1] < losses[0]
    assert all(torch.equal(before[n], p) for n, p in m.named_parameters())  # base and task vectors frozen
    assert float(at.lam.detach().abs().sum()) > 0


def test_atlas_gradient_is_the_inner_product_with_the_task_vector():
    m = _llama_with_tasks()
    at = ATLAS(m, ["t0", "t1"], init=0.3)
    ids = torch.randint(0, 64, (2, 5))
    loss = at(input_ids=ids, labels=ids).loss
    loss.backward()
    # dL/dlambda_{t,b} = <dL/dW_b, tau_{t,b}>: compare with the gradient of a dense weight perturbation
    path = at.paths[0]
    host = m.get_submodule(path)
    W = host.base_layer.weight
    dW = {s: torch.zeros_like(W, requires_grad=True) for s in range(1)}
    h = host.base_layer.register_forward_hook(lambda mod, a, o: o + a[0] @ dW[0].t())
    at.zero_grad()
    loss2 = at(input_ids=ids, labels=ids).loss
    loss2.backward()
    h.remove()
    tau = _dw(m, "t0")[path]
    torch.testing.assert_close(at.lam.grad[0, 0], (dW[0].grad * tau).sum(), atol=1e-6, rtol=1e-4)


def test_atlas_bakes_into_a_plain_lora():
    m = _llama_with_tasks()
    ids = torch.randint(0, 64, (2, 5))
    at = ATLAS(m, ["t0", "t1"], init=[0.2, 0.9])
    with torch.no_grad():
        at.lam[0, 1] = -0.5  # anisotropic
    y = at(input_ids=ids).logits
    at.to_adapter("baked")
    torch.testing.assert_close(m(input_ids=ids).logits, y, atol=1e-5, rtol=1e-5)
    assert lorakit.attachment(m, "baked").method.name == "lora"
