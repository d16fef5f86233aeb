import copy
import math

import pytest
import torch

import lorakit
from conftest import MLP
from _drive import train

OPTS = {"method": "triadaptlora", "targets": ["lin0", "lin1", "out"], "r": 1, "reference_rank": 4,
        "incre_rank_num": 1, "max_r": 6, "alpha": 8.0, "seed": 0}


def _model(**kw):
    torch.manual_seed(0)
    m = MLP()
    lorakit.attach(m, {**OPTS, **kw})
    return m


def _ranks(m):
    return {p: a.rank for p, a in lorakit.adapters(m)}


def _hand_core(a, spans):
    """C = L + U built piece by piece: row piece (s, e) of L spans columns 0..e, column piece of U rows 0..e."""
    R = a.max_r
    C = torch.zeros(R, R)
    for s, e in spans:
        C[s:e, :e] += a.lora_L.detach()[s:e, :e]
        C[:e, s:e] += a.lora_U.detach()[:e, s:e]
    return C


def _perturb(a, g):
    """Random values for A, B and the used (masked) entries of L and U."""
    with torch.no_grad():
        for p, mask in zip((a.lora_A, a.lora_B, a.lora_L, a.lora_U), (1.0, 1.0, *a.masks())):
            p.add_(torch.randn(p.shape, generator=g) * 0.3 * mask)


def test_noop_init_identity_core_and_zero_b():
    m = _model()
    for _, a in lorakit.adapters(m):
        assert torch.all(a.delta_weight() == 0) and torch.all(a.delta(torch.randn(4, a.view.d_in)) == 0)
        eye = torch.zeros(6, 6)
        eye[0, 0] = 1
        assert torch.equal(a.lora_L.detach(), eye) and torch.equal(a.lora_U.detach(), eye)
        assert torch.equal(a.core().detach(), 2 * eye) and a.rank == 1 and a.n_pieces == 1
        assert a.pieces.tolist() == [1, 0, 0, 0, 0, 0]


def test_masks_are_block_triangular_and_outside_entries_stay_zero_without_gradient():
    m = _model()
    a = dict(lorakit.adapters(m))["lin1"]
    a.grow(2)
    a.grow(1)
    spans = [(0, 1), (1, 3), (3, 4)]
    assert a.pieces.tolist() == [1, 3, 3, 4, 0, 0] and a.rank == 4 and a.n_pieces == 3
    mL, mU = a.masks()
    eL, eU = torch.zeros(6, 6, dtype=torch.bool), torch.zeros(6, 6, dtype=torch.bool)
    for s, e in spans:
        eL[s:e, :e] = True
        eU[:e, s:e] = True
    assert torch.equal(mL, eL) and torch.equal(mU, eU)
    diag = torch.zeros(6, 6, dtype=torch.bool)
    for s, e in spans:
        diag[s:e, s:e] = True
    assert torch.equal(mL & mU, diag) and torch.equal((mL | mU)[:4, :4], torch.ones(4, 4, dtype=torch.bool))
    off = ~diag  # off the diagonal blocks, L is strictly lower and U strictly upper triangular
    assert torch.equal(mL & off, (mL & off).tril(-1)) and torch.equal(mU & off, (mU & off).triu(1))
    _perturb(a, torch.Generator().manual_seed(2))  # B != 0, so the core gets gradient
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x = torch.randn(8, 12)
    for _ in range(3):
        opt.zero_grad()
        (m(x).pow(2).mean() + lorakit.extra_loss(m)).backward()
        assert torch.all(a.lora_L.grad[~mL] == 0) and torch.all(a.lora_U.grad[~mU] == 0)
        assert torch.all(a.lora_A.grad[4:] == 0) and torch.all(a.lora_B.grad[:, 4:] == 0)  # unused slots
        assert a.lora_L.grad[mL].abs().sum() > 0 and a.lora_B.grad[:, :4].abs().sum() > 0
        opt.step()
    assert torch.all(a.lora_L[~mL] == 0) and torch.all(a.lora_U[~mU] == 0)
    assert torch.allclose(a.core().detach(), _hand_core(a, spans))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_delta_weight_is_continuous_across_growth_and_new_slots_train(dtype):
    m = _model().to(dtype)
    a = dict(lorakit.adapters(m))["lin0"]
    g = torch.Generator().manual_seed(1)
    _perturb(a, g)  # |ΔW| ~ 1
    x = torch.randn(5, 12, dtype=dtype)
    tol = 1e-7 if dtype == torch.float64 else 2e-6  # float32: rounding of s·B at |ΔW| ~ 1
    for k in (1, 2):
        before, y0 = a.delta_weight().detach().clone(), a.delta(x).detach().clone()
        n = a.rank
        a.grow(k, g)
        assert (a.delta_weight().detach() - before).abs().max() <= tol
        assert torch.allclose(a.delta(x).detach(), y0, atol=10 * tol)
        assert torch.all(a.lora_B[:, n:n + k] == 0) and a.lora_A[n:n + k].abs().sum() > 0
        assert torch.equal(a.core().detach()[n:n + k, n:n + k], 2 * torch.eye(k, dtype=dtype))
        a.zero_grad()
        a.delta(x).pow(2).sum().backward()
        assert torch.all(a.lora_B.grad[:, n:n + k].abs().sum(0) > 0)  # the grown columns of B learn at once
        _perturb(a, g)


def test_number_of_growing_modules_follows_the_linear_threshold():
    m = _model(reference_rank=8, max_r=8, init_warmup=2, incre_interval=3)
    (c,) = lorakit.training_controllers(m)
    c.on_train_begin(m, None, 50)
    mods = c.mods()
    paths = [p for p, _ in mods]
    assert c.budget == 24
    for step in (1, 2, 4, 5, 7):  # not an allocation step (warmup / interval): nothing grows, scores untouched
        c.step(step, m, None)
    assert _ranks(m) == dict.fromkeys(paths, 1)
    for step in (6, 9, 42):
        want = [0.3, 0.1, 0.2]  # distinct importance: set the previous value accordingly
        for (p, a), s in zip(mods, want):
            c.prev[p] = a.norm_score() - s
        left = 24 - c.total_rank()
        n = min(max(int(left * (step - 2) / (50 - 2)), 1), 3)
        before = _ranks(m)
        c.step(step, m, None)
        grown = [p for p in paths if _ranks(m)[p] > before[p]]
        order = [paths[0], paths[2], paths[1]]
        assert grown == sorted(order[:n], key=paths.index), (step, n)
        assert all(_ranks(m)[p] == before[p] + 1 for p in grown)
    assert [min(max(int(l * (s - 2) / 48), 1), 3) for l, s in ((21, 6), (20, 9), (18, 42))] == [1, 2, 3]


def test_importance_score_reference_and_previous_value_update():
    m = _model()
    (c,) = lorakit.training_controllers(m)
    mods = c.mods()
    a = dict(mods)["lin1"]
    a.grow(2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # arbitrary values inside the masks
        mL, mU = a.masks()
        a.lora_L.copy_(torch.randn(6, 6, generator=g) * mL)
        a.lora_U.copy_(torch.randn(6, 6, generator=g) * mU)
    ref = torch.linalg.matrix_norm(_hand_core(a, [(0, 1), (1, 3)])).item() / 2
    prev = c.prev["lin1"]
    assert math.isclose(prev, 2 / 1)  # ‖2·I_1‖_F / 1 piece at construction
    scores = dict(zip([p for p, _ in mods], c.scores(mods)))
    assert math.isclose(scores["lin1"], ref - prev, rel_tol=1e-6) and math.isclose(c.prev["lin1"], ref, rel_tol=1e-6)
    assert scores["lin0"] == 0.0  # unchanged module: no increase
    assert c.scores(mods)[1] == 0.0  # measured from the last allocation


def test_total_rank_never_decreases_and_stops_exactly_at_the_budget():
    m = _model(target_total_rank=8, incre_rank_num=2)  # budget 8 from 3: a step of 2 must be cut to fit
    seen = []
    train(m, torch.randn(6, 12), 12, hook=lambda step, ctrls: seen.append(ctrls[0].total_rank()))
    assert seen == sorted(seen) and max(seen) == 8 and seen[-1] == 8 and seen[0] == 3 and seen[1] > 3
    assert all(1 <= r <= 6 for r in _ranks(m).values())


def test_extra_loss_reference():
    m = _model()
    for _, a in lorakit.adapters(m):
        _perturb(a, torch.Generator().manual_seed(5))
        a.grow(1)
    ref = 0.0
    for _, a in lorakit.adapters(m):
        A, B = a.lora_A[:2].detach(), a.lora_B[:, :2].detach()
        ref += (torch.linalg.matrix_norm(A @ A.t() - torch.eye(2)) + torch.linalg.matrix_norm(B.t() @ B - torch.eye(2)))
    assert torch.allclose(lorakit.extra_loss(m).detach(), 0.5 * ref / (2 * 3), rtol=1e-5)


def _run(m, x, opt, ctrl, start, stop):
    m.train()
    for step in range(start, stop):
        opt.zero_grad()
        (m(x).pow(2).mean() + lorakit.extra_loss(m)).backward()
        ctrl.before_step(step, m, opt)
        opt.step()
        ctrl.step(step, m, opt)


def _setup():
    m = _model()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    (c,) = lorakit.training_controllers(m)
    c.on_train_begin(m, opt, 12)
    return m, opt, c


def test_controller_state_resumes_exactly_and_files_record_growth(tmp_path):
    x = torch.randn(5, 12)
    full, opt, c = _setup()
    _run(full, x, opt, c, 0, 12)
    cut, opt, c = _setup()
    _run(cut, x, opt, c, 0, 5)
    saved = [copy.deepcopy(o.state_dict()) for o in (cut, opt, c)]
    resumed, opt, c = _setup()
    for o, s in zip((resumed, opt, c), saved):
        o.load_state_dict(s)
    _run(resumed, x, opt, c, 5, 12)
    assert _ranks(resumed) == _ranks(full) and sum(_ranks(full).values()) == 12
    for (_, a), (_, b) in zip(lorakit.adapters(full), lorakit.adapters(resumed)):
        for k, v in a.state_dict().items():
            assert torch.equal(v, b.state_dict()[k]), k
    full.eval()
    ref = full(x).detach()
    lorakit.save_adapter(full, tmp_path / "a")
    torch.manual_seed(0)
    fresh = MLP()
    lorakit.load_adapter(fresh, tmp_path / "a")
    assert _ranks(fresh) == _ranks(full)
    assert torch.allclose(fresh.eval()(x), ref, atol=1e-6)
    assert torch.allclose(lorakit.merge_and_unload(fresh)(x), ref, atol=1e-5)


def test_non_linear_growth_count():
    m = _model(reference_rank=8, max_r=8, rank_growth_model="non-linear")
    (c,) = lorakit.training_controllers(m)
    c.on_train_begin(m, None, 40)
    # left = 21: n = int(exp(m · log 21)) = int(21^m), clamped to [1, 3]
    assert [c.n_grow(s, 3) for s in (1, 10, 20, 30)] == [min(max(int(21 ** (s / 40)), 1), 3) for s in (1, 10, 20, 30)]
    assert [c.n_grow(s, 3) for s in (1, 10, 20, 30)] == [1, 2, 3, 3]
