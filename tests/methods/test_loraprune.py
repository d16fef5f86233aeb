"""LoRAPrune mechanism (arXiv:2305.18403): unit importance from the LoRA gradients (formula written here), EMA, local
pruning of the lowest units on the cubic schedule, skipped blocks, and masked == physically pruned."""
import pytest
import torch

import lorakit
from lorakit.methods.loraprune import cubic_ratio, export_pruned
from conftest import tiny_llama
from train.conftest import cls_data, tiny_lm_dir  # noqa: F401


def _model(**kw):
    m = tiny_llama(layers=4)  # 4 heads, 2 kv heads, head_dim 8, intermediate 64
    torch.manual_seed(0)
    lorakit.attach(m, {"method": "loraprune", "targets": "all-linear", "r": 4, "alpha": 8, **kw})
    with torch.no_grad():
        for _, a in lorakit.adapters(m):
            a.lora_B.weight.normal_(std=0.1)
    return m


def _backward(m, seed=0):
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(seed))
    m.zero_grad()
    m(ids, labels=ids).loss.backward()


def _independent_unit_scores(m, blk):
    """|Ĝ ⊙ (W0 + sBA)|, Ĝ = gB·A + B·gA − gB·gA; per unit, L2-normalised per matrix, summed per part."""
    ad = dict(lorakit.adapters(m))
    out = {"self_attn": 0, "mlp": 0}
    for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                        ("mlp", ("gate_proj", "up_proj", "down_proj"))):
        for n in names:
            a = ad[f"{blk}.{part}.{n}"]
            A, B = a.lora_A.weight, a.lora_B.weight
            gA, gB = A.grad, B.grad
            G = gB @ A + B @ gA - gB @ gA
            I = (G * (a.base.weight + a.scale * B @ A)).abs()
            if n in ("o_proj", "down_proj"):
                I = I.t()
            u = I.sum(1)
            if part == "self_attn":
                u = u.reshape(-1, 8).sum(1)  # heads
                if n in ("q_proj", "o_proj"):
                    u = u.reshape(2, 2).sum(1)  # 4 query heads -> 2 kv groups
            out[part] = out[part] + u / u.norm()
    return out


def test_importance_follows_the_lora_gradient_formula():
    m = _model()
    ctl = lorakit.attachment(m, "default").controller()
    assert ctl.prunable == ["model.layers.0", "model.layers.1", "model.layers.2"]  # the last block is never pruned
    _backward(m)
    ctl.before_step(1, m, None)
    ref = _independent_unit_scores(m, "model.layers.1")
    for part in ("self_attn", "mlp"):
        assert torch.allclose(ctl.scores["model.layers.1"][part], 0.1 * ref[part].detach(), atol=1e-6)
    _backward(m, seed=1)
    ctl.before_step(2, m, None)
    ref2 = _independent_unit_scores(m, "model.layers.1")
    assert torch.allclose(ctl.scores["model.layers.1"]["mlp"], 0.9 * 0.1 * ref["mlp"].detach() + 0.1 * ref2["mlp"].detach(),
                          atol=1e-6)


def test_masks_prune_the_lowest_units_and_follow_the_schedule():
    m = _model(target_ratio=0.5, prune_every=1, initial_warmup=0.0, final_warmup=0.5)
    ctl = lorakit.attachment(m, "default").controller()
    ctl.on_train_begin(m, None, 4)
    _backward(m)
    ctl.before_step(1, m, None)
    scores = {b: {p: v.clone() for p, v in d.items()} for b, d in ctl.scores.items()}
    ctl.step(3, m, None)  # step 3 of 4 with final warmup 0.5: the target ratio
    assert cubic_ratio(3, 4, 0.0, 0.5, 0.5) == 0.5
    for blk in ctl.prunable:
        ch = ctl.unit_mask(blk, "mlp")
        assert int((ch == 0).sum()) == 32
        lowest = set(torch.argsort(scores[blk]["mlp"])[:32].tolist())
        assert set((ch == 0).nonzero().flatten().tolist()) == lowest
        kv = ctl.unit_mask(blk, "self_attn")
        assert int((kv == 0).sum()) == 1 and int(torch.argmin(scores[blk]["self_attn"])) == int((kv == 0).nonzero())
    last = ctl.unit_mask("model.layers.3", "mlp")
    assert bool(last.all())  # never pruned
    # the cubic schedule: 0 during the initial warmup, monotone, the target at the end
    r = [cubic_ratio(s, 100, 0.1, 0.2, 0.5) for s in range(101)]
    assert r[10] == 0 and r[100] == 0.5 and all(b >= a for a, b in zip(r, r[1:]))


def test_masked_model_equals_physically_pruned_and_merge():
    m = _model(target_ratio=0.5, prune_every=1, initial_warmup=0.0, final_warmup=0.5)
    ctl = lorakit.attachment(m, "default").controller()
    ctl.on_train_begin(m, None, 4)
    _backward(m)
    ctl.before_step(1, m, None)
    ctl.step(4, m, None)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        masked = m(ids).logits
        small = export_pruned(m)
        assert small.model.layers[0].mlp.down_proj.weight.shape == (32, 32)
        assert small.model.layers[0].self_attn.k_proj.weight.shape == (8, 32)
        assert small.model.layers[3].mlp.down_proj.weight.shape == (32, 64)
        assert torch.allclose(small(ids).logits, masked, atol=1e-5)


def test_bad_options():
    with pytest.raises(lorakit.LorakitError, match="target_ratio"):
        _model(target_ratio=1.2)
    with pytest.raises(lorakit.LorakitError, match="final_warmup"):
        _model(initial_warmup=0.6, final_warmup=0.5)


def test_trains_through_lorakit_train_and_the_file_carries_the_masks(tiny_lm_dir, cls_data, tmp_path):
    from safetensors.torch import load_file

    from lorakit.cli import main

    kv = {"model.name": tiny_lm_dir, "data.task": "classify-lm", "data.path": cls_data, "data.max_length": 32,
          "data.eval_size": 16, "adapter.method": "loraprune", "adapter.targets": "all-linear", "adapter.r": 4,
          "adapter.prune_every": 1, "adapter.initial_warmup": 0.0, "adapter.final_warmup": 0.5,
          "adapter.target_ratio": 0.5, "optim.lr": 0.01, "train.steps": 4, "output.dir": tmp_path / "run"}
    assert main(["train", *[f"{k}={v}" for k, v in kv.items()]]) == 0
    f = next((tmp_path / "run").rglob("adapter_model.safetensors"))
    masks = {k: v for k, v in load_file(str(f)).items() if k.endswith("prune_mask")}
    up0 = next(v for k, v in masks.items() if "layers.0.mlp.up_proj" in k)
    up1 = next(v for k, v in masks.items() if "layers.1.mlp.up_proj" in k)
    assert float((up0 == 0).float().mean()) == 0.5  # the first of two blocks reached the target
    assert bool(up1.all())  # the last block is never pruned
