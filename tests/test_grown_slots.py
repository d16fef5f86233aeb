"""Grown rank slots (IncreLoRA, TriAdaptLoRA) train as the authors' new parameter groups do: fresh AdamW moments and
step count, their own warmup from lr 0, and (TriAdaptLoRA) no weight decay. The reference below is AdamW written out
for a parameter group created at the growth step (Loshchilov & Hutter; torch.optim.AdamW's formula), independent of
lorakit.procedures.slots."""
from __future__ import annotations

import math

import torch

import lorakit
from lorakit.procedures import Hyper, make_procedure, setup
from lorakit.procedures.slots import set_run_warmup, slot_warmup_of

from conftest import MLP

B1, B2, EPS = 0.9, 0.999, 1e-8
RANKS: list[dict] = []  # per step of the last _run: {module path: rank in use during that optimizer step}


def _model(opts):
    torch.manual_seed(0)
    m = MLP()
    lorakit.attach(m, {"targets": ["lin0", "lin1"], "seed": 0, **opts})
    return m


def _run(m, steps, lr, wd, use_setup=True, run_warmup=0, seed=0, real=False, old_steps=0):
    """The trainer's order (before_step -> opt.step -> step) with fake random gradients; records, per step, every
    adapter tensor before the step, its gradient, and after the step."""
    ctrls = lorakit.training_controllers(m)
    if use_setup:
        _, opt = setup(m, make_procedure("adamw", {}, Hyper(lr=lr, weight_decay=wd)))
        set_run_warmup(opt, run_warmup)
    else:
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr, weight_decay=wd)
    for c in ctrls:
        c.on_train_begin(m, opt, steps)
    params = dict((n, p) for n, p in m.named_parameters() if p.requires_grad)
    g = torch.Generator().manual_seed(seed)
    rec, ranks = [], RANKS
    ranks.clear()
    m.train()
    for step in range(steps):
        opt.zero_grad()
        if real:  # a real loss: slots not in use get no gradient (their moments decay to 0)
            m(torch.randn(8, 12, generator=g)).pow(2).mean().backward()
        else:
            for p in params.values():
                p.grad = torch.randn(p.shape, generator=g)
        for c in ctrls:
            c.before_step(step, m, opt)
        before = {n: p.detach().clone() for n, p in params.items()}
        grads = {n: p.grad.clone() for n, p in params.items()}
        opt.step()
        if step == 0 and old_steps:  # as if the tensors had trained for long (AdamW's bias corrections ≈ 1)
            for st in opt.state.values():
                st["step"] += old_steps
        rec.append((before, grads, {n: p.detach().clone() for n, p in params.items()}))
        ranks.append({p: int(a.stats()["rank"]) for p, a in lorakit.adapters(m)})  # rank used by this step
        for c in ctrls:
            c.step(step, m, opt)
    return rec, opt


def _fresh_group_reference(rec, name, idx, start, lr, wd, warmup):
    """AdamW of a parameter group born at step ``start`` (zero moments, own step count k = 1, 2, ...,
    lr_k = lr · min(1, k / warmup)): the values of entries ``idx`` of tensor ``name`` after each step."""
    m = v = None
    out = []
    x = rec[start][0][name][idx].double()
    for k, (before, grads, _) in enumerate(rec[start:], start=1):
        gk = grads[name][idx].double()
        m = (1 - B1) * gk if m is None else B1 * m + (1 - B1) * gk
        v = (1 - B2) * gk ** 2 if v is None else B2 * v + (1 - B2) * gk ** 2
        lr_k = lr * (min(1.0, k / warmup) if warmup > 0 else 1.0)
        x = x * (1 - lr_k * wd)
        x = x - lr_k * (m / (1 - B1 ** k)) / ((v / (1 - B2 ** k)).sqrt() + EPS)
        out.append(x.clone())
    return out


INCR = {"method": "incrlora", "r": 1, "target_rank": 3, "init_warmup": 20, "incre_interval": 2, "top_h": 2,
        "incre_rank_num": 1, "alpha": 8.0}


def _growth(path="lin0"):
    """First optimizer step of the last _run whose rank in ``path`` exceeds the previous step's."""
    return next(i for i in range(1, len(RANKS)) if RANKS[i][path] > RANKS[i - 1][path])


def test_increlora_new_slot_follows_a_fresh_adamw_group_with_warmup():
    lr, wd, W = 1e-2, 0.01, 4
    m = _model({**INCR, "grow_warmup": W})
    rec, _ = _run(m, 30, lr, wd)
    name = "lin0.adapters.default.lora_E"
    s = _growth()
    assert s > 20  # the tensor has taken > 20 AdamW steps: bias corrections ~ inherited step count
    k = RANKS[s - 1]["lin0"]  # the activated row
    got = torch.stack([after[name][k, 0] for _, _, after in rec[s:]]).double()
    ref = torch.stack(_fresh_group_reference(rec, name, (k, 0), s, lr, wd, W))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    # the first step has the nominal warmup size lr/W (|m̂/√v̂| = 1 at k = 1), not ≈3x lr
    first = abs(float(rec[s][2][name][k, 0] - rec[s][0][name][k, 0] * (1 - lr / W * wd)))
    assert first == pytest_approx(lr / W)


def pytest_approx(x, rel=1e-3):
    import pytest

    return pytest.approx(x, rel=rel)


def test_increlora_fresh_reserves_a_and_b_follow_a_fresh_group():
    lr, wd = 1e-2, 0.0
    m = _model({**INCR, "grow_warmup": None})
    rec, opt = _run(m, 30, lr, wd, run_warmup=3)  # None: the run's warmup (3 steps)
    name_e = "lin0.adapters.default.lora_E"
    s = _growth()
    n_act = RANKS[s]["lin0"]
    a = dict(lorakit.adapters(m))["lin0"]
    lo, hi = n_act, n_act + a.add_r  # the reserves drawn at this growth
    for name, idx in (("lin0.adapters.default.lora_A", (slice(lo, hi),)),
                      ("lin0.adapters.default.lora_B", (slice(None), slice(lo, hi)))):
        got = torch.stack([after[name][idx] for _, _, after in rec[s:]]).double()
        ref = torch.stack(_fresh_group_reference(rec, name, idx, s, lr, wd, 3))
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    assert slot_warmup_of(opt) is not None and slot_warmup_of(opt).run_warmup == 3


def test_without_the_hooks_a_grown_slot_takes_an_inflated_first_step():
    """What the fix removes: plain AdamW over the same tensors moves the new slot by ≈ 0.1/√0.001 ≈ 3.2 lr at its
    first gradient; a fresh group (no warmup) moves it by exactly lr (|m̂/√v̂| = 1 at k = 1)."""
    lr = 1e-2
    name = "lin0.adapters.default.lora_E"

    def first_move(use_setup):
        m = _model({**INCR, "grow_warmup": 0})
        rec, _ = _run(m, 30, lr, 0.0, use_setup=use_setup, real=True, old_steps=10_000)
        s = _growth()
        k = RANKS[s - 1]["lin0"]
        moves = [abs(float(after[name][k, 0] - before[name][k, 0])) for before, _, after in rec[s:]]
        assert moves[0] == 0.0  # born after this step's backward: no gradient yet
        return moves[1]

    assert first_move(False) > 2.5 * lr
    assert first_move(True) == pytest_approx(lr)


TRI = {"method": "triadaptlora", "r": 1, "reference_rank": 3, "incre_rank_num": 1, "max_r": 4, "alpha": 8.0,
       "init_warmup": 10, "incre_interval": 3, "total_step": 40}


def test_triadaptlora_new_pieces_follow_a_fresh_group_without_weight_decay():
    lr, wd, W = 1e-2, 0.05, 2
    m = _model({**TRI, "grow_warmup": W})
    rec, _ = _run(m, 25, lr, wd)
    a = dict(lorakit.adapters(m))["lin0"]
    # the step after the first growth (growth runs in the controllers' step, after opt.step)
    s = _growth()
    n, mm = RANKS[s - 1]["lin0"], RANKS[s]["lin0"]
    for name, idx in (("lin0.adapters.default.lora_A", (slice(n, mm),)),
                      ("lin0.adapters.default.lora_B", (slice(None), slice(n, mm))),
                      ("lin0.adapters.default.lora_L", (slice(n, mm), slice(0, mm))),
                      ("lin0.adapters.default.lora_U", (slice(0, mm), slice(n, mm)))):
        # only the entries inside the piece's mask move (the rest stay 0 without gradient effect)
        got = torch.stack([after[name][idx] for _, _, after in rec[s:s + 4]]).double()
        ref = torch.stack(_fresh_group_reference(rec[:s + 4], name, idx, s, lr, 0.0, W))
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6, msg=name)
    assert a.rank >= mm


def test_slot_ages_survive_an_optimizer_checkpoint():
    lr = 1e-2
    m = _model({**INCR, "grow_warmup": 50})
    rec, opt = _run(m, 26, lr, 0.0)
    sd = opt.state_dict()
    ages = [st["lorakit_slot_age"] for st in sd["state"].values() if "lorakit_slot_age" in st]
    assert ages and all(float(a.max()) >= 1 for a in ages)
    m2 = _model({**INCR, "grow_warmup": 50})
    _, opt2 = setup(m2, make_procedure("adamw", {}, Hyper(lr=lr)))
    opt2.load_state_dict(sd)
    ages2 = [st["lorakit_slot_age"] for st in opt2.state_dict()["state"].values() if "lorakit_slot_age" in st]
    assert all(torch.equal(a, b) for a, b in zip(ages, ages2))
    assert math.isfinite(float(ages2[0].sum()))
