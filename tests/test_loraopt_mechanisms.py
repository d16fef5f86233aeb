"""LoRA-aware optimisers (issue 17, part 2): each mechanism against the paper's formula, computed here independently
(brute-force least squares, autograd on the merged weight, hand-written row norms), not through lorakit's helpers.

* ALLoRA: the effective per-row step is AdamW's step times 1/sqrt(‖θ_i‖² + 1/η²); dropout/scale refused early.
* LoRA-Pro: the equivalent gradient of the adjusted (g_A, g_B) is the least-squares optimum over all pairs
  (lstsq on the Kronecker system), the pair is the optimal one closest to LoRA's gradients (lstsq over X), the Adam
  variant keeps full-space moments, and the logged error equals the brute-force residual of the true G.
* LoRA-GGPO: the perturbation's row norms, its removal (weights after the step = AdamW from the unperturbed weights
  with the perturbed-point gradient), rho=0 = adamw.
* Flexora: the gate gradient is the validation loss's at the unrolled point, the selection is the top gates, and
  stage 2 trains only the selected layers.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit.errors import ConfigError
from lorakit.procedures import make_procedure, setup


class One(nn.Module):
    def __init__(self, d_in=9, d_out=12):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.lin(x)


def _lora(r=3, alpha=6, seed=0, **kw):
    torch.manual_seed(seed)
    m = lorakit.attach(One(), {"method": "lora", "targets": ["lin"], "r": r, "alpha": alpha, "seed": seed, **kw})
    ad = m.lin.adapters["default"]
    with torch.no_grad():  # a non-zero B: the general case (B = 0 is step 0 only)
        ad.lora_B.weight.copy_(torch.randn(ad.lora_B.weight.shape, generator=torch.Generator().manual_seed(seed + 7)))
    return m, ad


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 9, generator=g), torch.randn(16, 12, generator=g)


def _loss(m, x, t):
    return ((m(x) - t) ** 2).sum()


def _full_grad(ad, x, t):
    """G = dL/dW at the merged weight W0 + s·B·A (autograd on a leaf W; independent of the adapter's backward)."""
    W = (ad.base.weight + ad.scale * ad.lora_B.weight @ ad.lora_A.weight).detach().requires_grad_(True)
    L = ((nn.functional.linear(x, W, ad.base.bias) - t) ** 2).sum()
    (G,) = torch.autograd.grad(L, W)
    return G


def _best_equiv(B, A, s, G):
    """Brute force: min over (gA, gB) of ‖G − s(B gA + gB A)‖ by lstsq on the explicit linear map; returns the
    optimal equivalent gradient (unique) and its residual."""
    m, r = B.shape
    n = A.shape[1]
    cols = []
    for k in range(r * n):
        E = torch.zeros(r * n, dtype=torch.float64)
        E[k] = 1
        cols.append((s * B @ E.view(r, n)).flatten())
    for k in range(m * r):
        E = torch.zeros(m * r, dtype=torch.float64)
        E[k] = 1
        cols.append((s * E.view(m, r) @ A).flatten())
    M = torch.stack(cols, 1)
    sol = torch.linalg.lstsq(M, G.flatten().unsqueeze(1), driver="gelsd").solution
    eq = (M @ sol).view(m, n)
    return eq, float((G - eq).norm())


# ------------------------------------------------------------------------------------------------------ LoRA-Pro
def _lorapro_step(adam=False, lr=0.1):
    m, ad = _lora()
    x, t = _data()
    proc = make_procedure("lorapro", {"adam": adam, "log_every": 0}, lorakit.procedures.Hyper(lr=lr))
    _, opt = setup(m, proc)
    A0, B0 = ad.lora_A.weight.detach().clone(), ad.lora_B.weight.detach().clone()
    G = _full_grad(ad, x, t).double()
    _loss(m, x, t).backward()
    gA, gB = ad.lora_A.weight.grad.double().clone(), ad.lora_B.weight.grad.double().clone()
    proc.before_step(0, m, opt)
    opt.step()
    ga = (A0 - ad.lora_A.weight.detach()).double() / lr
    gb = (B0 - ad.lora_B.weight.detach()).double() / lr
    return ad, opt, A0.double(), B0.double(), G, gA, gB, ga, gb


def test_lorapro_adjusted_gradients_are_the_least_squares_optimum_closest_to_lora():
    ad, _, A, B, G, gA, gB, ga, gb = _lorapro_step()
    s = ad.scale
    assert torch.allclose(gA, s * B.T @ G, rtol=1e-4, atol=1e-4)  # LoRA's gradients are projections of G
    assert torch.allclose(gB, s * G @ A.T, rtol=1e-4, atol=1e-4)
    eq_best, res_best = _best_equiv(B, A, s, G)
    eq = s * B @ ga + s * gb @ A
    assert torch.allclose(eq, eq_best, atol=1e-3 * float(G.norm()))
    assert abs(float((G - eq).norm()) - res_best) < 1e-3 * float(G.norm())
    plain = s * B @ gA + s * gB @ A  # plain LoRA's equivalent gradient is strictly worse here
    assert float((G - plain).norm()) > res_best * 1.01
    # among the optimal pairs (ga + XA, gb − BX), ours is the closest to LoRA's gradients: the best X is 0
    r = A.shape[0]
    cols = []
    for k in range(r * r):
        E = torch.zeros(r * r, dtype=torch.float64)
        E[k] = 1
        X = E.view(r, r)
        cols.append(torch.cat([(X @ A).flatten(), (-B @ X).flatten()]))
    M = torch.stack(cols, 1)
    rhs = torch.cat([(gA - ga).flatten(), (gB - gb).flatten()]).unsqueeze(1)
    X = torch.linalg.lstsq(M, rhs, driver="gelsd").solution
    assert float(X.abs().max()) < 1e-3 * float(ga.abs().max() / A.abs().max())


def test_lorapro_adam_keeps_full_space_moments_of_the_equivalent_gradient():
    ad, opt, A, B, G, *_ , ga, gb = _lorapro_step(adam=True, lr=0.01)
    s = ad.scale
    st = opt.state[ad.lora_A.weight]
    eq_best, _ = _best_equiv(B, A, s, G)
    assert st["exp_avg"].shape == (12, 9) and float(st["step"]) == 1  # full (d_out, d_in) state
    assert torch.allclose(st["exp_avg"].double(), 0.1 * eq_best, atol=1e-4 * float(G.norm()))
    u = (st["exp_avg"] / 0.1) / ((st["exp_avg_sq"] / 1e-3).sqrt() + 1e-8)  # Adam's first direction m̂/(√v̂+ε)
    u_best, _ = _best_equiv(B, A, s, u.double())  # the factors move along the projection of u
    assert torch.allclose(s * B @ ga + s * gb @ A, u_best, atol=1e-3 * float(u.norm()))


def test_lorapro_logs_the_equivalent_gradient_error_of_the_true_gradient():
    m, ad = _lora()
    x, t = _data()
    proc = make_procedure("lorapro", {"log_every": 1})
    _, opt = setup(m, proc)
    G = _full_grad(ad, x, t).double()
    proc.before_forward(0, m, opt)
    _loss(m, x, t).backward()
    proc.before_step(0, m, opt)
    assert ad.base.weight.grad is None and not proc._watch  # G from hooks; the hooks are gone after the step
    got = proc.step_metrics()
    _, res = _best_equiv(ad.lora_B.weight.detach().double(), ad.lora_A.weight.detach().double(), ad.scale, G)
    assert got["equiv_grad_rel_error"] == pytest.approx(res / float(G.norm()), rel=1e-3)
    assert got["lora_grad_rel_error"] > got["equiv_grad_rel_error"]


def test_lorapro_refuses_methods_that_are_not_sBA():
    from lorakit.train import resolve

    with pytest.raises(ConfigError, match=r"optim.name=lorapro: .*method 'vera'"):
        resolve(overrides=["optim.name=lorapro"], method="vera")
    with pytest.raises(ConfigError, match=r"magnitude.*method 'dora' trains roles A, B, magnitude"):
        resolve(overrides=["optim.name=lorapro", "adapter.method=dora"])


# -------------------------------------------------------------------------------------------------------- ALLoRA
def test_allora_effective_row_step_is_adamw_step_over_row_norm():
    eta = 2.0
    m, ad = _lora(r=3, alpha=3)
    x, t = _data()
    ref = copy.deepcopy(m)
    proc = make_procedure("allora", {"eta": eta}, lorakit.procedures.Hyper(lr=0.05, weight_decay=0.1))
    _, opt = setup(m, proc)
    proc.on_train_begin(m, opt, 1)
    ropt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
    before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    for model in (m, ref):
        _loss(model, x, t).backward()
    proc.before_step(0, m, opt)
    opt.step()
    proc.after_step(0, m, opt)
    ropt.step()
    refp = dict(ref.named_parameters())
    for n, p in m.named_parameters():
        if not p.requires_grad:
            continue
        step, ref_step = p.detach() - before[n], refp[n].detach() - before[n]
        c = 1.0 / torch.sqrt((before[n] ** 2).sum(1, keepdim=True) + 1 / eta ** 2)
        assert torch.allclose(step, c * ref_step, atol=1e-7), n


def test_allora_refuses_dropout_and_scaling_at_config_resolution():
    from lorakit.train import resolve

    with pytest.raises(ConfigError, match=r"dropout-free and scaling-free.*scale=2.*adapter.alpha=8"):
        resolve(overrides=["optim.name=allora", "adapter.r=8", "adapter.alpha=16"])
    with pytest.raises(ConfigError, match="dropout=0.1"):
        resolve(overrides=["optim.name=allora", "adapter.r=8", "adapter.alpha=8", "adapter.dropout=0.1"])
    assert resolve(overrides=["optim.name=allora", "adapter.r=8", "adapter.alpha=8"]).optim.name == "allora"
    assert resolve("sentiment-smollm2-allora").optim.name == "allora"  # the recipe passes its own check


# ------------------------------------------------------------------------------------------------------ LoRA-GGPO
def test_ggpo_perturbation_form_and_removal():
    rho, gam = 0.3, 0.5
    m, ad = _lora()
    x, t = _data()
    proc = make_procedure("ggpo", {"rho": rho, "grad_weight": gam}, lorakit.procedures.Hyper(lr=0.05))
    _, opt = setup(m, proc)
    proc.on_train_begin(m, opt, 2)
    ref = copy.deepcopy(m)
    ropt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=0.05, weight_decay=0.0)
    names = {n for n in proc.last_eps} or {"lin.adapters.default.lora_A.weight", "lin.adapters.default.lora_B.weight"}
    prev_gn: dict = {}
    for step in range(2):
        theta = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
        proc.before_forward(step, m, opt)
        for n, eps in proc.last_eps.items():  # row norms: rho * (gamma*|g_prev| + (1-gamma)*|theta|)
            want = rho * ((1 - gam) * theta[n].norm(dim=1) + gam * prev_gn.get(n, torch.zeros(eps.shape[0])))
            assert torch.allclose(eps.norm(dim=1), want, rtol=1e-5, atol=1e-7), n
            assert torch.allclose(dict(m.named_parameters())[n].detach(), theta[n] + eps)
        assert set(proc.last_eps) == names
        # the reference: gradient at the perturbed point, step from the unperturbed weights
        rp = dict(ref.named_parameters())
        with torch.no_grad():
            for n, eps in proc.last_eps.items():
                rp[n].add_(eps)
        _loss(ref, x, t).backward()
        with torch.no_grad():
            for n in proc.last_eps:
                rp[n].copy_(theta[n])
        _loss(m, x, t).backward()
        proc.before_step(step, m, opt)
        assert all(torch.equal(p.detach(), theta[n]) for n, p in m.named_parameters() if p.requires_grad)
        prev_gn = {n: dict(m.named_parameters())[n].grad.norm(dim=1) for n in proc.last_eps}
        opt.step()
        ropt.step()
        opt.zero_grad()
        ropt.zero_grad()
        for n, p in m.named_parameters():
            if p.requires_grad:
                assert torch.allclose(p, rp[n], atol=1e-6), (step, n)


def test_mgpo_gradient_is_taken_at_the_official_weight_space_perturbation():
    """The official LoRA-MGPO step (llm172/LoRA-MGPO trainer.py), written on the dense weight: V = s(m_B A + B m_A),
    ε = −ρ V/‖V‖ · min(1/ḡ, 10), ḡ the EMA of ‖s(g_B A + B g_A)‖ (first value as is); the gradient of A and B is
    taken with W0 + ε as the base weight; the factors themselves are never moved."""
    rho, beta, lr = 0.2, 0.5, 0.05
    m, ad = _lora()
    ref = copy.deepcopy(m)
    rad = ref.lin.adapters["default"]
    x, t = _data()
    proc = make_procedure("mgpo", {"rho": rho, "ema": beta}, lorakit.procedures.Hyper(lr=lr))
    _, opt = setup(m, proc)
    rparams = [rad.lora_A.weight, rad.lora_B.weight]
    ropt = torch.optim.AdamW(rparams, lr=lr, weight_decay=0.0)
    proc.on_train_begin(m, opt, 4)
    s, gbar, seen_eps = ad.scale, None, 0
    for step in range(4):
        A0, B0 = ad.lora_A.weight.detach().clone(), ad.lora_B.weight.detach().clone()
        proc.before_forward(step, m, opt)
        # the reference: dense ε on the base weight of a copy, from the same formula
        eps = torch.zeros_like(rad.base.weight)
        st_a, st_b = ropt.state.get(rparams[0], {}), ropt.state.get(rparams[1], {})
        if "exp_avg" in st_a:
            V = s * (st_b["exp_avg"] @ rparams[0].detach() + rparams[1].detach() @ st_a["exp_avg"])
            c = 1.0 if gbar is None else min(1.0 / (gbar + 1e-12), 10.0)
            eps = -rho * V / (V.norm() + 1e-12) * c
            seen_eps += 1
        with torch.no_grad():
            rad.base.weight.add_(eps)
        _loss(m, x, t).backward()
        _loss(ref, x, t).backward()
        with torch.no_grad():
            rad.base.weight.sub_(eps)
        proc.before_step(step, m, opt)
        assert torch.equal(ad.lora_A.weight.detach(), A0) and torch.equal(ad.lora_B.weight.detach(), B0)
        for p, q in zip([ad.lora_A.weight, ad.lora_B.weight], rparams):
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-5), step
        gn = float((s * (rparams[1].grad @ rparams[0].detach() + rparams[1].detach() @ rparams[0].grad)).norm())
        gbar = gn if gbar is None else beta * gbar + (1 - beta) * gn
        opt.step()
        ropt.step()
        opt.zero_grad()
        ropt.zero_grad()
        if step == 0:
            assert proc.last_eps == {}  # no momentum yet: no perturbation
    assert seen_eps == 3
    assert float(eps.norm()) > 0  # the last step was perturbed, by a non-trivial ε
    ((name, _),) = proc.last_eps.items()
    assert torch.allclose(proc.perturbation(name), eps, rtol=1e-4, atol=1e-7)
    assert not proc._hooks  # removed before the step: the model computes what its file says


# -------------------------------------------------------------------------------------------------------- Flexora
def _unrolled_gate_grad(ref, m, xi, va, leaf, gate):
    """The reference for Flexora's gate gradient, written independently: ``ref`` (a copy of ``m``, whose adapters'
    gradients are computed) stepped by ``θ' = θ − ξ g``, each layer's LoRA output scaled by ``gate(layer)`` (a
    function of the explicit ``leaf``), and ``dL_val/d leaf`` on the validation batch."""
    for name, mod in ref.named_modules():
        if type(mod).__name__ == "LoRA":
            i = int(name.split(".")[2])
            mod.register_forward_hook(lambda mod, a, out, i=i: a[1] + gate(i) * (out - a[1]))
    with torch.no_grad():
        for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
            if p.requires_grad:
                q.sub_(xi * p.grad)
    (want,) = torch.autograd.grad(ref(input_ids=va, labels=va).loss, leaf)
    return want


def _flexora_setup():
    from conftest import tiny_llama

    torch.manual_seed(0)
    m = lorakit.attach(tiny_llama(layers=3), {"method": "lora", "targets": ["q_proj", "v_proj"], "r": 2, "seed": 0})
    for n, p in m.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(3)
    tr = torch.randint(0, 64, (4, 10), generator=g)
    va = torch.randint(0, 64, (4, 10), generator=g)
    return m, tr, va


def test_flexora_hypergradient_matches_finite_differences_of_the_unrolled_validation_loss():
    """d/dα L_val(θ − ξ∇θ L_train(θ, α), α), by central differences in α on a float64 copy (the exact unrolled
    objective, autograd with create_graph for the inner gradient), against the procedure's hyper-gradient."""
    m, tr, va = _flexora_setup()
    m.double()

    def L(x):  # float64 end to end (transformers' own loss upcasts logits to float32 only)
        logits = m.lm_head(m.model(input_ids=x).last_hidden_state)
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))

    xi = 0.5
    proc = make_procedure("flexora", {"unroll_lr": xi, "gates": "direct", "second_order": True})
    proc.set_validation(lambda i, split="validation": L(tr if split == "train" else va))
    _, opt = setup(m, proc)
    proc.on_train_begin(m, opt, 100)
    L(tr).backward()
    proc.before_step(0, m, opt)
    got = proc.last_gate_grad

    def unrolled(alpha):
        with torch.no_grad():
            proc.gates.copy_(alpha)
        params = [p for p in m.parameters() if p.requires_grad]
        g = torch.autograd.grad(L(tr), params)
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, d in zip(params, g):
                p.sub_(xi * d)
            out = float(L(va))
            for p, p0 in zip(params, saved):
                p.copy_(p0)
        return out

    h = 1e-4
    base = torch.ones(3, dtype=torch.float64)
    fd = torch.tensor([(unrolled(base + h * e) - unrolled(base - h * e)) / (2 * h) for e in torch.eye(3)], dtype=torch.float64)
    assert torch.allclose(got.double(), fd, rtol=2e-2, atol=2e-4), (got, fd)


def test_flexora_gate_gradient_is_the_validation_loss_at_the_unrolled_point_and_selection_is_top_gates():
    m, tr, va = _flexora_setup()
    xi = 0.5
    proc = make_procedure("flexora", {"unroll_lr": xi, "keep": 0.34, "gate_lr": 0.1, "second_order": False,
                                      "gates": "direct", "select": "top"})
    proc.set_validation(lambda i, split="validation": m(input_ids=va, labels=va).loss)
    _, opt = setup(m, proc)
    proc.on_train_begin(m, opt, 100)
    assert proc.layers == ["model.layers.0", "model.layers.1", "model.layers.2"]
    m(input_ids=tr, labels=tr).loss.backward()
    # independent: θ' = θ − ξ g on a copy whose adapters are scaled by explicit gate leaves, then dL_val/dgate
    ref = copy.deepcopy(m)
    proc._remove_gates()
    gates = torch.ones(3, requires_grad=True)
    want = _unrolled_gate_grad(ref, m, xi, va, gates, lambda i: gates[i])
    proc._install_gates()
    proc.before_step(0, m, opt)
    assert torch.allclose(proc.last_gate_grad, want, rtol=1e-4, atol=1e-7)
    assert float(want.abs().min()) > 0
    with torch.no_grad():
        proc.gates.copy_(torch.tensor([0.2, 1.7, 0.9]))
    assert proc.selection() == ["model.layers.1"]  # keep 0.34 of 3 -> 1 layer: the largest gate


def test_flexora_official_defaults_softmax_gates_first_order_and_the_layers_that_rose():
    """kithib/Flexora flora.py: gates = L·softmax(h), h from 0, Adam(lr 0.01) on h with the validation loss's gradient
    (no second-order term); selected = the layers with h > 0. The reference: explicit logits on a copy."""
    m, tr, va = _flexora_setup()
    plain = m(input_ids=va).logits.detach()
    xi = 0.5
    proc = make_procedure("flexora", {"unroll_lr": xi})
    assert (proc.cfg.gates, proc.cfg.select, proc.cfg.second_order, proc.cfg.gate_lr) == ("softmax", "increased",
                                                                                         False, 0.01)
    proc.set_validation(lambda i, split="validation": m(input_ids=va, labels=va).loss)
    _, opt = setup(m, proc)
    proc.on_train_begin(m, opt, 100)
    assert torch.equal(proc.gates.detach(), torch.zeros(3))
    assert torch.allclose(m(input_ids=va).logits, plain, atol=1e-6)  # all gates 1: plain LoRA
    m(input_ids=tr, labels=tr).loss.backward()
    ref = copy.deepcopy(m)
    proc._remove_gates()
    h = torch.zeros(3, requires_grad=True)
    want = _unrolled_gate_grad(ref, m, xi, va, h, lambda i: 3 * torch.exp(h[i]) / torch.exp(h).sum())
    proc._install_gates()
    proc.before_step(0, m, opt)
    assert torch.allclose(proc.last_gate_grad, want, rtol=1e-4, atol=1e-8)
    assert abs(float(want.sum())) < 1e-6 and float(want.abs().max()) > 0  # softmax: the logits' gradient sums to 0
    # Adam's first step moves every logit by -lr·sign(grad): those with a negative gradient rose above 0
    assert torch.allclose(proc.gates.detach(), -0.01 * torch.sign(want), atol=1e-6)
    up = [f"model.layers.{i}" for i in range(3) if float(want[i]) < 0]
    assert proc.selection() == up and 0 < len(up) < 3
    with torch.no_grad():
        proc.gates.copy_(torch.tensor([-0.1, 0.2, 0.05]))
    assert proc.selection() == ["model.layers.1", "model.layers.2"]
    assert torch.allclose(proc.gate_values().sum(), torch.tensor(3.0))
    with torch.no_grad():
        proc.gates.copy_(torch.tensor([-0.1, -0.3, -0.05]))
    assert proc.selection() == ["model.layers.2"]  # none rose: the largest one


def test_flexora_second_stage_trains_only_the_selected_layers():
    m, tr, va = _flexora_setup()
    proc = make_procedure("flexora", {"search_fraction": 0.5, "keep": 0.34, "select": "top"},
                          lorakit.procedures.Hyper(lr=0.01))
    proc.set_validation(lambda i, split="validation": m(input_ids=va, labels=va).loss)
    _, opt = setup(m, proc)
    proc.on_train_begin(m, opt, 4)

    def step(i):
        proc.before_forward(i, m, opt)
        m(input_ids=tr, labels=tr).loss.backward()
        proc.before_step(i, m, opt)
        opt.step()
        proc.after_step(i, m, opt)
        opt.zero_grad(set_to_none=True)

    step(0)
    step(1)  # the search ends after step 2 of 4... (search_steps = 2)
    assert proc.selected is not None and len(proc.selected) == 1
    chosen = proc.selected[0]
    snap = {n: p.detach().clone() for n, p in m.named_parameters() if "lora_" in n}
    for n, p in m.named_parameters():
        if "lora_B" in n and not n.startswith(chosen):
            assert p.abs().sum() == 0 and not p.requires_grad  # no-op and frozen
    step(2)
    step(3)
    for n, p in m.named_parameters():
        if "lora_" in n:
            assert torch.equal(p.detach(), snap[n]) != n.startswith(chosen), n
    assert not proc._hooks  # gates removed: the model computes what its file says
