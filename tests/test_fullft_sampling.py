"""LISA (layer sampling) and FRUGAL (gradient splitting): the mechanisms on a tiny Llama trained in full."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.procedures import make_procedure, setup
from lorakit.procedures.base import Hyper

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_llama  # noqa: E402


def _full(layers=4):
    m = tiny_llama(layers=layers, hidden=32)
    return lorakit.attach(m, {"method": "full", "targets": ".*", "keep_original": False})


def _step(m, proc, opt, step, seed=0):
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed + step))
    m.train()
    m(input_ids=x, labels=x).loss.backward()
    proc.before_step(step, m, opt)
    opt.step()
    proc.after_step(step, m, opt)
    opt.zero_grad(set_to_none=True)


def _block(name):
    import re

    g = re.search(r"layers\.(\d+)\.", name)
    return int(g.group(1)) if g else None


def test_lisa_trains_exactly_gamma_layers_per_period_embeddings_always():
    m = _full(layers=4)
    proc = make_procedure("lisa", {"layers": 2, "interval": 3, "seed": 1}, Hyper(lr=1e-2))
    params, opt = setup(m, proc)
    proc.on_train_begin(m, opt, 12)
    seen = []
    for period in range(4):
        active = list(proc.active)
        seen.append(tuple(active))
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        for k in range(3):
            _step(m, proc, opt, period * 3 + k)
            if k < 2:  # within the period: only the sampled blocks have gradients / state
                trainable = {_block(n) for n, p in m.named_parameters() if p.requires_grad} - {None}
                assert trainable == set(active)
                state_blocks = {_block(n) for n, p in m.named_parameters() if p in opt.state} - {None}
                assert state_blocks == set(active)
        for n, p in m.named_parameters():
            b = _block(n)
            if b is None:  # embeddings, final norm (and the tied head) train in every period
                assert not torch.equal(p, before[n]), n
            elif b not in active:  # frozen blocks are bit-identical across the period
                assert torch.equal(p, before[n]), n
            elif "layernorm" not in n:
                assert not torch.equal(p, before[n]), n
    assert all(len(a) == 2 for a in seen) and len(set(seen)) > 1  # re-sampled


def test_lisa_state_resumes_the_same_sequence():
    m = _full(layers=6)
    a = make_procedure("lisa", {"layers": 2, "interval": 1, "seed": 3}, Hyper())
    _, opt = setup(m, a)
    a.on_train_begin(m, opt, 10)
    a.after_step(0, m, opt)
    st = a.state_dict()
    seq = []
    for s in range(1, 5):
        a.after_step(s, m, opt)
        seq.append(a.active)
    b = make_procedure("lisa", {"layers": 2, "interval": 1, "seed": 3}, Hyper())
    m = _full(layers=6)  # a new run: LISA has frozen blocks of the first model
    _, opt2 = setup(m, b)
    b.on_train_begin(m, opt2, 10)
    b.load_state_dict(st)
    again = []
    for s in range(1, 5):
        b.after_step(s, m, opt2)
        again.append(b.active)
    assert again == seq


def test_frugal_state_free_blocks_carry_no_state_and_update_by_sign():
    m = _full(layers=2)
    proc = make_procedure("frugal", {"density": 0.25, "update_gap": 2, "seed": 0}, Hyper(lr=1e-3))
    params, opt = setup(m, proc)
    proc.on_train_begin(m, opt, 4)
    blocks = proc._blocks
    assert len(blocks) == 14 and len(proc.chosen) == round(0.25 * 14)  # 2 x 7 projections; lm_head: a head
    full_ids = {id(blocks[i]) for i in proc.chosen}
    before = {id(p): p.detach().clone() for p in blocks}
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    m(input_ids=x, labels=x).loss.backward()
    grads = {id(p): p.grad.detach().clone() for p in blocks}
    opt.step()
    for p in blocks:
        if id(p) in full_ids:
            assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
        else:
            assert p not in opt.state or not opt.state[p]  # state-free: nothing stored
            torch.testing.assert_close(p.detach(), before[id(p)] - 1e-3 * grads[id(p)].sign())
    others = [t.param for t in params if all(t.param is not b for b in blocks)]
    assert others and all(set(opt.state[p]) >= {"exp_avg", "exp_avg_sq"} for p in others)  # always state-full
    n_state = sum(s["exp_avg"].numel() for s in opt.state.values() if "exp_avg" in s)
    assert n_state == sum(p.numel() for p in others) + sum(blocks[i].numel() for i in proc.chosen)


def test_frugal_svd_split_sums_to_the_gradient_and_update_follows_the_formula():
    from torch import nn

    from lorakit.procedures.frugal import FrugalAdamW, split_gradient

    torch.manual_seed(0)
    G = torch.randn(16, 10)
    U, S, Vh = torch.linalg.svd(G)
    P = Vh[:3]
    R, full, free = split_gradient(G, P, "right")
    torch.testing.assert_close(full + free, G)
    torch.testing.assert_close(full, G @ Vh[:3].T @ Vh[:3])  # the part in the top-3 right singular subspace
    assert float((free @ Vh[:3].T).abs().max()) < 1e-5  # the rest is orthogonal to it
    p = nn.Parameter(torch.randn(16, 10))
    W0 = p.detach().clone()
    opt = FrugalAdamW([{"params": [p], "frugal": "svd", "density": 0.3, "update_gap": 5, "state_free": "signsgd"}],
                      lr=0.01, eps=1e-8)
    p.grad = G.clone()
    opt.step()
    # step 1 of Adam on R is R/|R|; rank round(0.3*10) = 3
    want = W0 - 0.01 * (R / (R.abs() + 1e-8)) @ P - 0.01 * free.sign()
    torch.testing.assert_close(p.detach(), want, rtol=1e-4, atol=1e-5)
    assert opt.state[p]["exp_avg"].shape == (16, 3)


def test_owlore_sampling_probabilities_follow_the_outlier_ratios():
    """D_l recomputed here from the paper's definition (Wanda scores |W|·‖X‖, share above M × mean, per block)."""
    m = _full(layers=4)
    with torch.no_grad():  # plant outliers: block 2 has many large weights, block 0 a few, 1 and 3 none
        m.model.layers[2].mlp.down_proj.weight[:, :4] *= 40
        m.model.layers[0].self_attn.q_proj.weight[:2, :2] *= 40
    proc = make_procedure("owlore", {"layers": 2, "interval": 2, "outlier_m": 5.0, "rank": 4, "update_proj_gap": 2},
                          Hyper(lr=1e-3))
    params, opt = setup(m, proc)
    proc.on_train_begin(m, opt, 6)
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    sq = {}

    def hook(mod, args):
        a = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        sq[mod] = sq.get(mod, 0) + (a * a).sum(0)

    lin = [(i, mod) for i, blk in enumerate(m.model.layers) for mod in blk.modules()
           if isinstance(mod, torch.nn.Linear)]
    hs = [mod.register_forward_pre_hook(hook) for _, mod in lin]
    m.train()
    m(input_ids=x, labels=x).loss.backward()
    for h in hs:
        h.remove()
    proc.before_step(0, m, opt)
    want = {}
    for i in range(4):
        a = torch.cat([(mod.weight.detach().abs().double() * sq[mod].sqrt()[None]).reshape(-1)
                       for j, mod in lin if j == i])
        want[i] = float((a > 5.0 * a.mean()).double().mean())
    total = sum(want.values())
    assert total > 0 and len({round(v, 12) for v in want.values()}) > 1  # non-uniform
    probs = proc.probabilities()
    assert all(abs(probs[i] - want[i] / total) < 1e-9 for i in range(4))
    assert abs(sum(probs.values()) - 1) < 1e-12
    assert len(proc.active) == 2 and all(probs[i] > 0 for i in proc.active)
    # step 0 updates exactly the sampled blocks; the projected state has GaLore's shape
    grads = {_block(n) for n, p in m.named_parameters() if p.grad is not None} - {None}
    assert grads == set(proc.active)
    opt.step()
    q = m.model.layers[proc.active[0]].self_attn.q_proj.base_layer.weight  # 32x32, rank 4: moments (32, 4)
    assert opt.state[q]["exp_avg"].shape == (32, 4)
    # the sampling frequencies follow p (blocks with D = 0 are never drawn)
    counts = {i: 0 for i in range(4)}
    for _ in range(200):
        for i in proc.sample():
            counts[i] += 1
    assert all(counts[i] == 0 for i in range(4) if probs[i] == 0)
