"""LT-SFT mechanism: after the full fine-tuning phase the mask is the global top-K |θ1 − θ0| (recomputed here), the
targets are rewound to θ0, and the sparse phase changes only masked entries while holding only the K entries
(parameters and optimiser state counted); the element product's gradients equal torch autograd on the dense formula;
two tasks' sparse deltas compose by addition (merged model = base + Δ1 + Δ2, read from the files)."""
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.methods._sparse import INDICES, SHAPE, VALUES
from conftest import MLP

FULL, STEPS, DENSITY = 3, 7, 0.1


def _train(seed=0, x_seed=2, hook=None):
    torch.manual_seed(seed)
    m = MLP()
    lorakit.attach(m, {"method": "lt_sft", "targets": ["lin0", "lin1"], "density": DENSITY, "full_steps": FULL})
    (ctrl,) = lorakit.training_controllers(m)
    ads = [a for _, a in lorakit.adapters(m)]
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ctrl.on_train_begin(m, opt, STEPS)
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(x_seed))
    for step in range(STEPS):
        opt.zero_grad()
        m(x).pow(2).mean().backward()
        ctrl.before_step(step, m, opt)
        opt.step()
        if hook:
            hook(step, ads, opt)
        ctrl.step(step, m, opt)
    return m, ads


def _dense(a):
    return a.delta_weight().detach().clone()


def test_mask_is_top_k_change_rewound_and_only_the_mask_retrains_holding_only_k_entries():
    seen = {"counts": []}

    def hook(step, ads, opt):
        if step == FULL - 1:  # θ1 − θ0 at the end of the full phase (before the controller selects)
            seen["d1"] = [_dense(a) for a in ads]
        seen["counts"].append((sum(a.sparse_values.numel() for a in ads),
                               sum(v.numel() for s in opt.state.values() for v in s.values() if v.dim() > 0)))

    m, ads = _train(hook=hook)
    d1 = seen["d1"]
    flat = torch.cat([d.abs().flatten() for d in d1])
    k = round(DENSITY * flat.numel())
    assert seen["counts"][0] == (flat.numel(), 2 * flat.numel())  # phase 1: dense delta + two moments
    assert all(c == (k, 2 * k) for c in seen["counts"][FULL:])  # phase 2: the K entries only
    cut = flat.sort(descending=True).values
    assert cut[k - 1] > cut[k]
    for a, d in zip(ads, d1):
        want = (d.abs() >= cut[k - 1]).flatten().nonzero().squeeze(1)  # global top-K |change|
        assert torch.equal(a.sparse_indices, want)
        assert a.sparse_values.shape == (want.numel(),)
        now = _dense(a)
        mask = torch.zeros(now.numel(), dtype=torch.bool)
        mask[want] = True
        mask = mask.view_as(now)
        assert torch.count_nonzero(now[~mask]) == 0  # rewound, and only the mask retrained
        assert torch.count_nonzero(now[mask]) == want.numel()
        assert not torch.equal(now[mask], d[mask])  # retrained from θ0
    assert sum(a.sparse_indices.numel() for a in ads) == k


def test_element_product_gradients_equal_autograd_on_the_dense_formula():
    from lorakit.methods._sparse import _ElementProduct

    g = torch.Generator().manual_seed(0)
    d_out, d_in = 6, 5
    idx = torch.tensor([0, 3, 7, 12, 29])
    fidx, fval = torch.tensor([4, 20]), torch.tensor([0.5, -2.0], dtype=torch.float64)
    val = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 4, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, d_out, generator=g, dtype=torch.float64)
    (_ElementProduct.apply(x.reshape(-1, d_in), val, idx, fidx, fval, d_out, d_in) * w).sum().backward()
    val2, x2 = val.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    dW = torch.zeros(d_out * d_in, dtype=torch.float64)
    dW = dW.index_put((idx,), val2).index_put((fidx,), fval).view(d_out, d_in)  # frozen entries: no gradient
    ((x2.reshape(-1, d_in) @ dW.t()) * w).sum().backward()
    assert torch.allclose(val.grad, val2.grad) and torch.allclose(x.grad, x2.grad)


def _file_delta(path, key, shape):
    t = load_file(str(path / "adapter_model.safetensors"))
    pre = f"base_model.model.{key}."
    assert tuple(t[pre + SHAPE].tolist()) == shape
    d = torch.zeros(shape[0] * shape[1])
    d[t[pre + INDICES]] = t[pre + VALUES]
    return d.view(shape)


def test_two_tasks_sparse_deltas_compose_by_addition(tmp_path):
    for i, xs in enumerate((2, 5)):
        m, _ = _train(x_seed=xs)
        lorakit.save_adapter(m, tmp_path / f"t{i}")
    torch.manual_seed(0)
    base = MLP()
    w0 = {k: v.clone() for k, v in base.state_dict().items()}
    lorakit.load_adapter(base, tmp_path / "t0", "t0")
    lorakit.load_adapter(base, tmp_path / "t1", "t1")
    lorakit.set_active(base, ["t0", "t1"])
    x = torch.randn(4, 12)
    y = base(x).detach()
    lorakit.merge_and_unload(base)
    assert torch.allclose(base(x), y, atol=1e-6)
    for key, shape in (("lin0", (16, 12)), ("lin1", (16, 16))):
        d0, d1 = _file_delta(tmp_path / "t0", key, shape), _file_delta(tmp_path / "t1", key, shape)
        assert torch.count_nonzero(d0) <= round(DENSITY * (16 * 12 + 16 * 16))
        assert torch.equal(base.state_dict()[key + ".weight"], (w0[key + ".weight"] + d0) + d1)
    assert torch.equal(base.out.weight, w0["out.weight"])
