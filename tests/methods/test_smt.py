"""SMT mechanism: the selected sub-matrices are the global top-n by gradient mass accumulated over the warm-up
(scores recomputed here from the recorded gradients); afterwards only they change, the rest stay bit-identical to
the base; after the selection only the selected blocks exist (parameters and optimiser state counted against
n·b²); the block product's gradients equal torch autograd on the dense formula; the file holds only their entries."""
import pytest
import torch

import lorakit
from lorakit.methods._sparse import INDICES
from conftest import _ids, tiny_llama

BLOCK, N, WARM = 4, 5, 3


def _run(score="mean_abs", steps=6, warmup="train"):
    m, x = tiny_llama(), _ids()
    lorakit.attach(m, {"method": "smt", "targets": "all-linear", "block": BLOCK, "blocks": N,
                       "warmup_steps": WARM, "score": score, "warmup": warmup})
    (ctrl,) = lorakit.training_controllers(m)
    ads = [a for _, a in lorakit.adapters(m)]
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ctrl.on_train_begin(m, opt, steps)
    grads, deltas, counts = [], [], []
    for step in range(steps):
        opt.zero_grad()
        m(x).logits.float().pow(2).mean().backward()
        # ∂L/∂W of each target, from the probe-free reference: the base weight's gradient is not tracked, so use the
        # layer's gradient of the dense delta in "train" mode and a recomputation in "score" mode (below)
        grads.append([a.sparse_values.grad.clone() if a.sparse_values.dim() == 2 else None for a in ads])
        ctrl.before_step(step, m, opt)
        opt.step()
        ctrl.step(step, m, opt)
        deltas.append([a.delta_weight().detach().clone() for a in ads])
        counts.append((sum(p.numel() for p in m.parameters() if p.requires_grad),
                       sum(v.numel() for s in opt.state.values() for v in s.values() if v.dim() > 0)))
    return m, ads, grads, deltas, counts


def _expected(ads, grads, score):
    # the paper's score written out: per block, the mean |G| (or |mean G|) summed over the warm-up steps; then the
    # global top-n over every block of every target
    entries = []
    for j, a in enumerate(ads):
        o, i = a.view.d_out // BLOCK, a.view.d_in // BLOCK
        for r in range(o):
            for c in range(i):
                s = 0.0
                for t in range(WARM):
                    blk = grads[t][j][r * BLOCK:(r + 1) * BLOCK, c * BLOCK:(c + 1) * BLOCK].double()
                    s += float(blk.abs().mean()) if score == "mean_abs" else float(blk.mean().abs())
                entries.append((s, j, r, c))
    entries.sort(key=lambda e: -e[0])
    assert entries[N - 1][0] > entries[N][0]  # no tie at the cut
    return {(j, r, c) for _, j, r, c in entries[:N]}


def _chosen(ads):
    out = set()
    for j, a in enumerate(ads):
        nc = a.view.d_in // BLOCK
        out |= {(j, int(q) // nc, int(q) % nc) for q in a.sparse_indices}
    return out


def test_selected_blocks_are_the_top_n_by_accumulated_gradient_mass():
    for score in ("mean_abs", "abs_mean"):
        m, ads, grads, deltas, _ = _run(score)
        assert _chosen(ads) == _expected(ads, grads, score)


def test_score_only_warm_up_selects_by_the_base_weights_gradient_and_holds_nothing_dense():
    m, ads, _, deltas, counts = _run(warmup="score")
    assert counts[0] == (0, 0)  # the warm-up holds no trainable entry and no optimiser state
    assert all(torch.count_nonzero(d) == 0 for d in deltas[0])  # and the targets do not move
    # reference: ∂L/∂W of every target at the base weights, by torch autograd on a copy whose weights require grad
    ref, x = tiny_llama(), _ids()
    for p in ref.parameters():
        p.requires_grad_(False)
    lin = [mod for name, mod in ref.named_modules() if isinstance(mod, torch.nn.Linear) and name != "lm_head"]
    for mod in lin:
        mod.weight.requires_grad_(True)
    ref(x).logits.float().pow(2).mean().backward()
    g = [mod.weight.grad for mod in lin]
    assert len(g) == len(ads)
    assert _chosen(ads) == _expected(ads, [g] * WARM, "mean_abs")


@pytest.mark.parametrize("warmup", ["train", "score"])
def test_after_selection_only_the_selected_blocks_exist_and_train(warmup, tmp_path):
    m, ads, grads, deltas, counts = _run(warmup=warmup)
    d_all = sum(a.view.d_out * a.view.d_in for a in ads)
    if warmup == "train":
        assert counts[0] == (d_all, 2 * d_all)  # the warm-up is full fine-tuning of the targets
        assert all(d.abs().sum() > 0 for d in deltas[0][:1])
    for t in range(WARM, len(counts)):  # n blocks of b×b values, and AdamW's two moments of each
        assert counts[t] == (N * BLOCK ** 2, 2 * N * BLOCK ** 2)
    assert sum(a.sparse_values.numel() for a in ads) == N * BLOCK ** 2
    for a in ads:
        assert a.sparse_values.shape == (a.sparse_indices.numel(), BLOCK, BLOCK)
    for t in range(WARM - 1, len(deltas)):  # from the selection on: zero outside the blocks, exactly
        for j, a in enumerate(ads):
            mask = torch.zeros(a.view.d_out // BLOCK, a.view.d_in // BLOCK, dtype=torch.bool)
            mask.view(-1)[a.sparse_indices] = True
            mask = mask.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
            assert torch.count_nonzero(deltas[t][j][~mask]) == 0
    changed = [not torch.equal(deltas[-1][j], deltas[WARM - 1][j]) for j, a in enumerate(ads)
               if a.sparse_indices.numel()]
    assert changed and all(changed)  # the selected blocks keep training
    lorakit.save_adapter(m, tmp_path / "a")
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert sum(v.numel() for k, v in t.items() if k.endswith(INDICES)) == N * BLOCK * BLOCK
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path / "a")
    x = _ids()
    assert torch.allclose(fresh(x).logits, m(x).logits, atol=1e-6)


def test_block_product_gradients_equal_autograd_on_the_dense_formula():
    from lorakit.methods._sparse import _BlockProduct

    g = torch.Generator().manual_seed(0)
    d_out, d_in, b = 12, 16, 4
    ids = torch.tensor([0, 5, 6, 11])  # block grid 3 x 4: (0,0), (1,1), (1,2), (2,3)
    vals = torch.randn(4, b, b, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(7, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, d_out, generator=g, dtype=torch.float64)
    (_BlockProduct.apply(x, vals, ids // 4, ids % 4, d_out, d_in) * w).sum().backward()
    # the dense formula: ΔW with block q at rows 4r..4r+3, columns 4c..4c+3; y = x ΔWᵀ
    vals2, x2 = vals.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    rows = []
    for r in range(3):
        rows.append(torch.cat([vals2[list(ids).index(r * 4 + c)] if r * 4 + c in ids.tolist()
                               else torch.zeros(b, b, dtype=torch.float64) for c in range(4)], 1))
    dW = torch.cat(rows, 0)
    ((x2 @ dW.t()) * w).sum().backward()
    assert torch.allclose(vals.grad, vals2.grad) and torch.allclose(x.grad, x2.grad)


def test_a_warm_up_as_long_as_the_run_is_refused_and_warmup_frac_scales_with_the_run():
    from lorakit.errors import ConfigError

    m = tiny_llama()
    lorakit.attach(m, {"method": "smt", "targets": "all-linear", "block": BLOCK, "blocks": N, "warmup_steps": 5})
    (ctrl,) = lorakit.training_controllers(m)
    with pytest.raises(ConfigError, match="nothing would be selected"):
        ctrl.on_train_begin(m, None, 5)
    lorakit.detach(m)
    lorakit.attach(m, {"method": "smt", "targets": "all-linear", "block": BLOCK, "blocks": N, "warmup_steps": 0,
                       "warmup_frac": 0.1})
    (ctrl,) = lorakit.training_controllers(m)
    ctrl.on_train_begin(m, None, 40)
    assert ctrl.select_at(40) == 4
