"""SaRA mechanism: the trained set is exactly the entries with |W0| < θ (and nothing else moves); the nuclear-norm
term is λ·‖W'⊙M‖_* of one layer drawn by torch's RNG, and its gradient reaches the trainable entries."""
import torch

import lorakit
from lorakit.attachments import get_attachment
from conftest import _ids, tiny_llama

TH = 0.01


def test_trained_set_is_exactly_the_below_threshold_set():
    m, x = tiny_llama(), _ids()
    w0 = {k: v.clone() for k, v in m.state_dict().items()}
    lorakit.attach(m, {"method": "sara", "targets": "all-linear", "threshold": TH, "lambda_rank": 1e-3})
    total = 0
    for path, a in lorakit.adapters(m):
        W = w0[path + ".weight"]
        want = (W.abs() < TH).flatten().nonzero().flatten()  # the mask, computed here
        assert torch.equal(a.sparse_indices, want)
        total += want.numel()
    assert 0 < total == sum(p.numel() for p in m.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        (m(x).logits.float().pow(2).mean() + lorakit.extra_loss(m)).backward()
        opt.step()
    lorakit.merge_and_unload(m)
    moved = 0
    for k, v in m.state_dict().items():
        if k.endswith("proj.weight"):
            M = w0[k].abs() < TH
            assert torch.equal(v[~M], w0[k][~M])  # outside the mask: bit-identical
            moved += int((v[M] != w0[k][M]).sum())
        else:
            assert torch.equal(v, w0[k])
    assert moved > 0.9 * total  # (nearly) every masked entry trained


def test_nuclear_norm_term_is_lambda_times_the_nuclear_norm_of_the_masked_weight_of_one_random_layer():
    m = tiny_llama()
    lorakit.attach(m, {"method": "sara", "targets": "all-linear", "threshold": TH, "lambda_rank": 0.3})
    ads = [a for _, a in lorakit.adapters(m)]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a in ads:
            a.sparse_values.normal_(generator=g)
    torch.manual_seed(11)
    loss = lorakit.extra_loss(m)
    torch.manual_seed(11)
    pick = ads[int(torch.randint(len(ads), ()))]  # no layer has min(d) > 64 in the tiny model: all are eligible
    W = pick.base_matrix().double()
    M = W.abs() < TH
    Wp = W.clone()
    Wp.view(-1)[pick.sparse_indices] += pick.sparse_values.detach().double()
    want = 0.3 * torch.linalg.svd(Wp * M)[1].sum()
    assert torch.allclose(loss.double(), want, rtol=1e-5)
    loss.backward()
    assert pick.sparse_values.grad is not None and pick.sparse_values.grad.abs().sum() > 0
    assert all(a.sparse_values.grad is None for a in ads if a is not pick)
    get_attachment(m, "default")  # still attached


def test_progressive_reselection_is_the_current_below_threshold_set_and_nothing_outside_moves():
    P, STEPS = 2, 5
    m, x = tiny_llama(), _ids()
    w0 = {k: v.clone() for k, v in m.state_dict().items()}
    lorakit.attach(m, {"method": "sara", "targets": "all-linear", "threshold": TH, "lambda_rank": 0.0,
                       "progressive_iter": P})
    (ctrl,) = lorakit.training_controllers(m)
    ads = dict(lorakit.adapters(m))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    ctrl.on_train_begin(m, opt, STEPS)
    seen = {}
    for step in range(STEPS):
        opt.zero_grad()
        m(x).logits.float().pow(2).mean().backward()
        if step == P:  # the current weights, before the re-selection
            seen["w"] = {p: w0[p + ".weight"] + a.delta_weight().detach() for p, a in ads.items()}
        ctrl.before_step(step, m, opt)
        if step == P:
            seen["after_select"] = {p: a.delta_weight().detach().clone() for p, a in ads.items()}
        opt.step()
        if step == P:  # that step makes no update, and the optimiser state starts afresh
            assert all(torch.equal(a.delta_weight(), seen["after_select"][p]) for p, a in ads.items())
            assert all(a.sparse_values not in opt.state for a in ads.values())
        ctrl.step(step, m, opt)
    shrank = False
    for path, a in ads.items():
        W = seen["w"][path]
        want = (W.abs() < TH).flatten().nonzero().flatten()  # |W_current| < θ, computed here
        assert torch.equal(a.sparse_indices, want)
        assert a.sparse_values.numel() == want.numel() and len(opt.state[a.sparse_values]["exp_avg"]) == want.numel()
        first = (w0[path + ".weight"].abs() < TH).flatten()
        shrank |= want.numel() < int(first.sum())
        d = a.delta_weight().flatten()
        assert torch.count_nonzero(d[~first]) == 0  # outside the first mask: never changed
        dropped = first.clone()
        dropped[want] = False
        assert torch.equal(d[dropped], seen["after_select"][path].flatten()[dropped])  # frozen at their change
    assert shrank  # the test exercises a real re-selection


def test_progressive_iter_past_the_run_is_refused():
    import pytest
    from lorakit.errors import ConfigError

    m = tiny_llama()
    lorakit.attach(m, {"method": "sara", "targets": "all-linear", "threshold": TH, "progressive_iter": 5})
    (ctrl,) = lorakit.training_controllers(m)
    with pytest.raises(ConfigError, match="progressive_iter=5"):
        ctrl.on_train_begin(m, None, 5)
