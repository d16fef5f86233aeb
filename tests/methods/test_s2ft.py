"""S2FT mechanism: co-permuting the FFN producers' rows and the target's columns leaves the function unchanged and
makes the selected channels the first n; permute -> train -> unpermute (merge_and_unload) is the identity outside
the selected channels; the file holds the original channel ids; detach is bit-exact even while merged."""
import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.errors import TargetError
from conftest import _ids, tiny_llama

CFG = {"method": "s2ft", "targets": ["down_proj"], "ratio": 0.25, "seed": 3}


def _train(m, x, steps, lr=1e-2):
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        m(x).logits.float().pow(2).mean().backward()
        opt.step()


def _weights(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _perm(selected, n_all):
    # the paper's co-permutation written out: selected channels first (ascending), then the rest (ascending)
    rest = [c for c in range(n_all) if c not in set(selected)]
    return torch.tensor(sorted(selected) + rest)


def test_permutation_alone_keeps_the_function_and_moves_the_selected_channels_first():
    m, x = tiny_llama(), _ids()
    w0, y0 = _weights(m), m(x).logits.detach()
    lorakit.attach(m, CFG)
    y1 = m(x).logits.detach()
    assert torch.allclose(y1, y0, atol=1e-5, rtol=1e-5)  # same function (summation order differs only)
    for i, layer in enumerate(m.model.layers):
        a = layer.mlp.down_proj.adapters["default"]
        sel = a.s2_channels.tolist()
        assert len(sel) == round(0.25 * 64)
        p = _perm(sel, 64)
        pre = f"model.layers.{i}.mlp."
        assert torch.equal(layer.mlp.gate_proj.weight, w0[pre + "gate_proj.weight"][p])
        assert torch.equal(layer.mlp.up_proj.weight, w0[pre + "up_proj.weight"][p])
        assert torch.equal(layer.mlp.down_proj.base_layer.weight, w0[pre + "down_proj.weight"][:, p])
        assert not torch.equal(p, torch.arange(64))  # the weights really moved


def test_permute_train_unpermute_is_the_identity_outside_the_selected_channels():
    m, x = tiny_llama(), _ids()
    w0 = _weights(m)
    lorakit.attach(m, CFG)
    ctl = [(layer.mlp.down_proj.adapters["default"]) for layer in m.model.layers]
    _train(m, x, 3)
    y = m(x).logits.detach()
    sel = [a.s2_channels.clone() for a in ctl]
    s2 = [a.s2.detach().clone() for a in ctl]
    assert all(s.abs().sum() > 0 for s in s2)
    lorakit.merge_and_unload(m)
    assert torch.allclose(m(x).logits, y, atol=1e-5, rtol=1e-5)
    w = _weights(m)
    for i in range(len(m.model.layers)):
        pre = f"model.layers.{i}.mlp."
        assert torch.equal(w[pre + "gate_proj.weight"], w0[pre + "gate_proj.weight"])  # original order again
        assert torch.equal(w[pre + "up_proj.weight"], w0[pre + "up_proj.weight"])
        d, d0 = w[pre + "down_proj.weight"], w0[pre + "down_proj.weight"]
        out = torch.ones(64, dtype=torch.bool)
        out[sel[i]] = False
        assert torch.equal(d[:, out], d0[:, out])  # untouched outside the selected channels, bit for bit
        assert torch.allclose(d[:, sel[i]], d0[:, sel[i]] + s2[i], atol=1e-7)  # ΔW[:, S] = s2
    for k in w0:
        if "mlp" not in k:
            assert torch.equal(w[k], w0[k]), k


def test_file_holds_the_original_channels_and_detach_while_merged_is_bit_exact(tmp_path):
    m, x = tiny_llama(), _ids()
    w0 = _weights(m)
    lorakit.attach(m, CFG)
    a = m.model.layers[1].mlp.down_proj.adapters["default"]
    with torch.no_grad():
        a.s2.normal_()
    lorakit.save_adapter(m, tmp_path / "a")
    t = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.mlp.down_proj."
    assert torch.equal(t[key + "s2.channels"], a.s2_channels) and torch.equal(t[key + "s2.weight"], a.s2)
    # the saved delta in original coordinates: ΔW[:, S] = s2, applied to the unpermuted base = the adapter's function
    y = m(x).logits.detach()
    ref = tiny_llama()
    with torch.no_grad():
        ref.model.layers[1].mlp.down_proj.weight[:, t[key + "s2.channels"]] += t[key + "s2.weight"]
    assert torch.allclose(ref(x).logits, y, atol=1e-5, rtol=1e-5)
    lorakit.merge(m)
    lorakit.detach(m)
    assert all(torch.equal(v, w0[k]) for k, v in m.state_dict().items())


def test_a_target_without_coupled_producers_is_refused_before_anything_changes():
    m = tiny_llama()
    w0 = _weights(m)
    with pytest.raises(TargetError, match="no coupled producers"):
        lorakit.attach(m, {**CFG, "targets": ["q_proj"]})
    assert all(torch.equal(v, w0[k]) for k, v in m.state_dict().items())
    lorakit.attach(m, {"method": "lora", "targets": ["up_proj"], "r": 2}, "other")
    with pytest.raises(TargetError, match="carries adapters"):
        lorakit.attach(m, CFG)


def test_up_rows_and_down_columns_follow_the_official_order_and_only_they_change(tmp_path):
    # the official u unit (u_ratio): up_proj rows of the channels U train next to down_proj columns of D; the order is
    # only_u + ud + only_d + rest (experiments/utils/s2_utils.py convert_ffn_layer_to_s2), written out here
    m, x = tiny_llama().double(), _ids()
    w0, y0 = _weights(m), m(x).logits.detach()
    lorakit.attach(m, {**CFG, "targets": ["up_proj", "down_proj"], "seed": 0})
    assert torch.allclose(m(x).logits, y0, atol=1e-12, rtol=0)
    for i, layer in enumerate(m.model.layers):
        u, d = layer.mlp.up_proj.adapters["default"], layer.mlp.down_proj.adapters["default"]
        U, D = set(u._units.tolist()), set(d._units.tolist())
        assert len(U) == len(D) == 16
        only_u, ud, only_d = sorted(U - D), sorted(U & D), sorted(D - U)
        order = torch.tensor(only_u + ud + only_d + [c for c in range(64) if c not in U | D])
        pre = f"model.layers.{i}.mlp."
        assert torch.equal(layer.mlp.gate_proj.weight, w0[pre + "gate_proj.weight"][order])
        assert torch.equal(layer.mlp.up_proj.base_layer.weight, w0[pre + "up_proj.weight"][order])
        assert torch.equal(layer.mlp.down_proj.base_layer.weight, w0[pre + "down_proj.weight"][:, order])
        assert (u._start, u._stop) == (0, 16) and u.s2.shape == (16, 32)
        assert (d._start, d._stop) == (len(only_u), len(only_u) + 16) and d.s2.shape == (32, 16)
    _train(m, x, 3)
    y = m(x).logits.detach()
    lorakit.save_adapter(m, tmp_path / "a")
    t = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    lorakit.merge_and_unload(m)
    assert torch.allclose(m(x).logits, y, atol=1e-6, rtol=0)
    w = _weights(m)
    for i in range(len(m.model.layers)):
        pre, key = f"model.layers.{i}.mlp.", f"base_model.model.model.layers.{i}.mlp."
        assert torch.equal(w[pre + "gate_proj.weight"], w0[pre + "gate_proj.weight"])
        rows, cols = t[key + "up_proj.s2.rows"], t[key + "down_proj.s2.channels"]
        assert torch.equal(rows, rows.sort().values) and torch.equal(cols, cols.sort().values)
        keep_r, keep_c = torch.ones(64, dtype=torch.bool), torch.ones(64, dtype=torch.bool)
        keep_r[rows], keep_c[cols] = False, False
        up, up0 = w[pre + "up_proj.weight"], w0[pre + "up_proj.weight"]
        dn, dn0 = w[pre + "down_proj.weight"], w0[pre + "down_proj.weight"]
        assert torch.equal(up[keep_r], up0[keep_r]) and torch.equal(dn[:, keep_c], dn0[:, keep_c])
        assert torch.allclose(up[rows], up0[rows] + t[key + "up_proj.s2.weight"], atol=1e-6)  # ΔW_up[U, :] = s2
        assert torch.allclose(dn[:, cols], dn0[:, cols] + t[key + "down_proj.s2.weight"], atol=1e-6)
        assert t[key + "up_proj.s2.weight"].abs().sum() > 0


def test_two_producers_of_one_ffn_are_refused():
    with pytest.raises(TargetError, match="one producer"):
        lorakit.attach(tiny_llama(), {**CFG, "targets": ["gate_proj", "up_proj"]})
