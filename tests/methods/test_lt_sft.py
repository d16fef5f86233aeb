"""LT-SFT mechanism: after the full fine-tuning phase the mask is the global top-K |θ1 − θ0| (recomputed here), the
targets are rewound to θ0, and the sparse phase changes only masked entries; two tasks' sparse deltas compose by
addition (merged model = base + Δ1 + Δ2, read from the files)."""
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
            hook(step, ads)
        ctrl.step(step, m, opt)
    return m, ads


def test_mask_is_top_k_change_rewound_and_only_the_mask_retrains():
    seen = {}

    def hook(step, ads):
        if step == FULL - 1:  # θ1 − θ0 at the end of the full phase (before the controller selects)
            seen["d1"] = [a.dense_delta.detach().clone() for a in ads]
        if step == FULL:  # first sparse step: started from θ0
            seen["after_rewind_support"] = [a.support.clone() for a in ads]

    m, ads = _train(hook=hook)
    d1 = seen["d1"]
    flat = torch.cat([d.abs().flatten() for d in d1])
    k = round(DENSITY * flat.numel())
    cut = flat.sort(descending=True).values
    assert cut[k - 1] > cut[k]
    for a, d in zip(ads, d1):
        assert torch.equal(a.support, d.abs() >= cut[k - 1])  # global top-K |change|
    assert sum(int(a.support.sum()) for a in ads) == k
    for a in ads:
        assert torch.count_nonzero(a.dense_delta[~a.support]) == 0  # rewound, and only the mask retrained
        assert torch.count_nonzero(a.dense_delta[a.support]) == int(a.support.sum())
        assert not torch.equal(a.dense_delta[a.support], d1[ads.index(a)][a.support])  # retrained from θ0


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
