"""What the sparse methods keep for the backward: after the selection (and for SaRA always) no tensor of the size of
the dense (d_out, d_in) delta is saved by the adapter's forward, only the layer input, the compact values and the
index set (checked with autograd's saved-tensor hooks on a layer whose matrix is larger than its input)."""
import pytest
import torch
from torch import nn

import lorakit

D_IN, D_OUT, ROWS = 64, 48, 3


class One(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D_IN, D_OUT)

    def forward(self, x):
        return self.lin(x)


def _saved_by_adapter(model, x):
    (a,) = [a for _, a in lorakit.adapters(model)]
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = a.delta(x)
    out.float().pow(2).sum().backward()
    return a, sizes


@pytest.mark.parametrize("cfg", [
    {"method": "sara", "threshold": 0.05},
    {"method": "smt", "block": 4, "blocks": 6, "warmup_steps": 1},
    {"method": "smt", "block": 4, "blocks": 6, "warmup_steps": 1, "warmup": "score"},
    {"method": "lt_sft", "density": 0.05, "full_steps": 1},
])
def test_no_dense_tensor_is_saved_for_the_backward(cfg):
    torch.manual_seed(0)
    m = One()
    lorakit.attach(m, {**cfg, "targets": ["lin"]})
    x = torch.randn(ROWS, D_IN, requires_grad=True)
    ctrls = lorakit.training_controllers(m)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for c in ctrls:
        c.on_train_begin(m, opt, 3)
    if ctrls:  # one step of the first phase, then the selection
        m(x).pow(2).mean().backward()
        for c in ctrls:
            c.before_step(0, m, opt)
        opt.step()
        for c in ctrls:
            c.step(0, m, opt)
        opt.zero_grad(set_to_none=True)
    a, sizes = _saved_by_adapter(m, x)
    k = a.sparse_values.numel()
    assert 0 < k < D_OUT * D_IN and a.sparse_values.grad is not None
    assert max(sizes) < D_OUT * D_IN  # nothing of the dense delta's size
    assert sum(sizes) <= ROWS * D_IN + 2 * k + a.sparse_indices.numel() + 2 * a.frozen_indices.numel()


@pytest.mark.parametrize("cfg", [
    {"method": "sara", "threshold": 0.05},
    {"method": "smt", "block": 4, "blocks": 6, "warmup_steps": 1, "warmup": "score"},
])
def test_products_under_bf16_autocast_match_fp32(cfg):
    """The trainer's bf16 precision runs the forward under autocast: the products accept its mixed dtypes and give
    the fp32 gradients to bf16 rounding."""
    torch.manual_seed(0)
    m = One()
    lorakit.attach(m, {**cfg, "targets": ["lin"]})
    (a,) = [a for _, a in lorakit.adapters(m)]
    if a.sparse_values.numel() == 0:  # SMT: select blocks directly (every 5th block of the 12 x 16 grid)
        a.compact(torch.arange(12 * 16).view(12, 16) % 5 == 0, rewind=True)
    with torch.no_grad():
        a.sparse_values.normal_()
    x = torch.randn(ROWS, D_IN)
    grads = []
    for bf16 in (False, True):
        a.sparse_values.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = m(x)
        y.float().pow(2).sum().backward()
        grads.append(a.sparse_values.grad.clone())
    assert grads[1].dtype == torch.float32
    assert torch.allclose(grads[0], grads[1], rtol=0.05, atol=0.05 * float(grads[0].abs().max()))
