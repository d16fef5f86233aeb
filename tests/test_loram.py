"""LoRAM (arXiv:2502.13533): structured pruning keeps whole kv groups / channels, the pruned model is the full model
restricted to the kept units, and recovery scatters the pruned LoRA back exactly (invariants of the reference)."""
import pytest
import torch

import lorakit
from lorakit import loram
from conftest import tiny_llama
from train.conftest import cls_data, tiny_lm_dir  # noqa: F401


def _ids(seed=3):
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(seed))


def test_prune_keeps_units_and_restricted_weights():
    full = tiny_llama(hidden=32, layers=2)  # 4 heads, 2 kv heads, head_dim 8, intermediate 64
    small, mask = loram.prune_model(full, 0.5)
    assert small.config.num_key_value_heads == 1 and small.config.num_attention_heads == 2
    assert small.config.intermediate_size == 32 and small.config.head_dim == 8
    q = mask.modules["model.layers.0.self_attn.q_proj"]["out"]
    o = mask.modules["model.layers.0.self_attn.o_proj"]["in"]
    assert q == o and len(q) == 16 and mask.modules["model.layers.0.self_attn.q_proj"]["in"] is None
    # a kept kv group keeps its two query heads (grouped-query attention stays consistent)
    kv = mask.modules["model.layers.0.self_attn.k_proj"]["out"]
    g = kv[0] // 8
    assert q == list(range(g * 16, g * 16 + 16))
    W = full.model.layers[0].mlp.down_proj.weight
    ch = mask.modules["model.layers.0.mlp.down_proj"]["in"]
    assert torch.equal(small.model.layers[0].mlp.down_proj.weight, W[:, ch])
    # importance = weight magnitude: the kept channels have the largest summed squared norms
    m = full.model.layers[0].mlp
    score = m.gate_proj.weight.pow(2).sum(1) + m.up_proj.weight.pow(2).sum(1) + m.down_proj.weight.pow(2).sum(0)
    assert set(ch) == set(torch.topk(score, 32).indices.tolist())
    assert small(_ids()).logits.shape == (2, 9, 64)  # the pruned model runs
    assert full.model.layers[0].mlp.down_proj.weight.shape == (32, 64)  # the full model is untouched


def test_pruned_model_saves_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    full = tiny_llama()
    small, mask = loram.prune_model(full, 0.5)
    out = loram.save_pruned(small, mask, tmp_path / "pruned")
    again = AutoModelForCausalLM.from_pretrained(out)
    x = _ids()
    assert torch.allclose(again(x).logits, small(x).logits, atol=1e-5)
    assert loram.PruneMask.load(out).modules == mask.modules
    with pytest.raises(lorakit.LorakitError, match="not empty"):
        loram.save_pruned(small, mask, out)


def _trained_small(ratio, seed=0):
    full = tiny_llama()
    small, mask = loram.prune_model(full, ratio)
    torch.manual_seed(seed)
    lorakit.attach(small, {"method": "lora", "targets": "all-linear", "r": 4, "alpha": 8})
    with torch.no_grad():
        for _, a in lorakit.adapters(small):
            a.lora_A.weight.normal_()
            a.lora_B.weight.normal_()
    return full, small, mask


def test_recovered_adapter_restricts_to_the_pruned_one():
    full, small, mask = _trained_small(0.5)
    loram.recover_adapter(small, full, mask)
    sm, fl = dict(lorakit.adapters(small)), dict(lorakit.adapters(full))
    assert sm.keys() == fl.keys()
    for path, a in sm.items():
        b = fl[path]
        assert tuple(b.base.weight.shape) == tuple(mask.full_shapes[path])  # the full model's shapes
        e = mask.modules[path]
        rows = e["out"] if e["out"] is not None else list(range(b.view.d_out))
        cols = e["in"] if e["in"] is not None else list(range(b.view.d_in))
        dW_small = a.scale * a.lora_B.weight @ a.lora_A.weight
        dW_full = b.scale * b.lora_B.weight @ b.lora_A.weight
        assert torch.allclose(dW_full[rows][:, cols], dW_small, atol=1e-6)
        assert torch.equal(b.lora_A.weight[:, cols], a.lora_A.weight)
        keep_r = torch.zeros(b.view.d_out, dtype=torch.bool)
        keep_r[rows] = True
        keep_c = torch.zeros(b.view.d_in, dtype=torch.bool)
        keep_c[cols] = True
        assert dW_full[~keep_r].abs().sum() == 0 and dW_full[:, ~keep_c].abs().sum() == 0  # zeroA


def test_identity_mask_recovers_unchanged_and_file_round_trip(tmp_path):
    full, small, mask = _trained_small(0.0)
    assert all(e["in"] is None and e["out"] is None for e in mask.modules.values())
    loram.recover_adapter(small, full, mask)
    x = _ids()
    assert torch.allclose(full(x).logits, small(x).logits, atol=1e-5)
    lorakit.save_adapter(full, tmp_path / "full")
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path / "full")
    assert torch.allclose(fresh(x).logits, full(x).logits, atol=1e-6)


def test_norm_a_fill_and_refusals():
    full, small, mask = _trained_small(0.5)
    loram.recover_adapter(small, full, mask, fill="normA")
    b = dict(lorakit.adapters(full))["model.layers.0.mlp.down_proj"]
    cols = mask.modules["model.layers.0.mlp.down_proj"]["in"]
    pruned = sorted(set(range(64)) - set(cols))
    assert b.lora_A.weight[:, pruned].abs().sum() > 0  # N(0, 1/r) in the pruned input columns
    with pytest.raises(lorakit.LorakitError, match="ratio"):
        loram.prune_model(tiny_llama(), 1.0)
    other = tiny_llama()
    lorakit.attach(other, {"method": "lora", "targets": "all-linear", "r": 2})
    with pytest.raises(lorakit.LorakitError, match="before attaching"):
        loram.prune_model(other, 0.5)
    wrong_full, wrong_small, _ = _trained_small(0.5)
    _, _, mask_other = _trained_small(0.25)
    with pytest.raises(lorakit.LorakitError, match="mask"):
        loram.recover_adapter(wrong_small, tiny_llama(), mask_other)


def test_cli_prune_train_recover(tiny_lm_dir, cls_data, tmp_path, capsys):
    """The user's job: prune -> `lorakit train` on the pruned model -> recover -> the full model loads it."""
    from lorakit.cli import main
    from lorakit.extract import load_pretrained

    pruned = tmp_path / "pruned"
    assert main(["loram", "prune", "--model", str(tiny_lm_dir), "--ratio", "0.5", "--out", str(pruned)]) == 0
    assert (pruned / loram.MASK_FILE).is_file()
    kv = {"model.name": pruned, "data.task": "classify-lm", "data.path": cls_data, "data.max_length": 32,
          "data.eval_size": 16, "adapter.targets": "all-linear", "adapter.r": 4, "optim.lr": 0.01,
          "train.steps": 3, "output.dir": tmp_path / "run"}
    assert main(["train", *[f"{k}={v}" for k, v in kv.items()]]) == 0
    adapter = next(p.parent for p in (tmp_path / "run").rglob("adapter_config.json"))
    assert main(["loram", "recover", "--pruned", str(pruned), "--adapter", str(adapter), "--base", str(tiny_lm_dir),
                 "--out", str(tmp_path / "full")]) == 0
    full = load_pretrained(tiny_lm_dir)
    lorakit.load_adapter(full, tmp_path / "full")
    assert len(dict(lorakit.adapters(full))) == 14  # 7 linear layers x 2 blocks, full shapes
    assert main(["loram", "recover", "--out", str(tmp_path / "x")]) == 2  # missing --pruned/--adapter
    assert main(["loram", "prune", "--model", str(tiny_lm_dir), "--ratio", "1.5", "--out", str(tmp_path / "y")]) == 2
