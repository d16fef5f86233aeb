"""SMT mechanism: the selected sub-matrices are the global top-n by gradient mass accumulated over the warm-up
(scores recomputed here from the recorded gradients); afterwards only they change, the rest stay bit-identical to
the base; the file holds only their entries."""
import torch

import lorakit
from lorakit.methods._sparse import INDICES
from conftest import _ids, tiny_llama

BLOCK, N, WARM = 4, 5, 3


def _run(score="mean_abs", steps=6):
    m, x = tiny_llama(), _ids()
    lorakit.attach(m, {"method": "smt", "targets": "all-linear", "block": BLOCK, "blocks": N,
                       "warmup_steps": WARM, "score": score})
    (ctrl,) = lorakit.training_controllers(m)
    ads = [a for _, a in lorakit.adapters(m)]
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ctrl.on_train_begin(m, opt, steps)
    grads, deltas = [], []
    for step in range(steps):
        opt.zero_grad()
        m(x).logits.float().pow(2).mean().backward()
        grads.append([a.dense_delta.grad.clone() for a in ads])
        ctrl.before_step(step, m, opt)
        opt.step()
        ctrl.step(step, m, opt)
        deltas.append([a.delta_weight().clone() for a in ads])
    return m, ads, grads, deltas


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
        blocks = a.support.reshape(a.view.d_out // BLOCK, BLOCK, a.view.d_in // BLOCK, BLOCK)
        full = blocks.all(3).all(1)
        assert torch.equal(blocks.any(3).any(1), full)  # whole blocks only
        out |= {(j, r, c) for r, c in full.nonzero().tolist()}
    return out


def test_selected_blocks_are_the_top_n_by_accumulated_gradient_mass():
    for score in ("mean_abs", "abs_mean"):
        m, ads, grads, deltas = _run(score)
        assert _chosen(ads) == _expected(ads, grads, score)


def test_only_the_selected_blocks_train_after_the_warm_up_and_the_file_is_block_sparse(tmp_path):
    m, ads, grads, deltas = _run()
    assert all(d.abs().sum() > 0 for d in deltas[0][:1])  # the warm-up trains the whole target
    for t in range(WARM - 1, len(deltas)):  # from the selection on: zero outside the blocks, exactly
        for a, d in zip(ads, deltas[t]):
            assert torch.count_nonzero(d[~a.support]) == 0
    changed = [not torch.equal(deltas[-1][j][a.support], deltas[WARM - 1][j][a.support]) for j, a in enumerate(ads)
               if a.support.any()]
    assert changed and all(changed)  # the selected blocks keep training
    assert sum(int(a.support.sum()) for a in ads) == N * BLOCK * BLOCK
    lorakit.save_adapter(m, tmp_path / "a")
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert sum(v.numel() for k, v in t.items() if k.endswith(INDICES)) == N * BLOCK * BLOCK


def test_a_warm_up_as_long_as_the_run_is_refused_and_warmup_frac_scales_with_the_run():
    import pytest
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
