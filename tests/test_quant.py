"""lorakit.quant: the NF4 format (code book, blockwise absmax, double quantisation, packing), QuantLinear as a
frozen base under adapters, and the bitsandbytes oracle (GPU only)."""
from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit import quant, quant_model
from lorakit.core import adaptable
from lorakit.quant import QuantConfig, QuantLinear

from conftest import run, tiny_llama

BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
           0.7229568362236023, 1.0]


def W(shape=(48, 80), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_nf4_code_book_exact():
    assert quant.NF4.tolist() == torch.tensor(BNB_NF4).tolist()
    assert torch.all(quant.NF4[1:] > quant.NF4[:-1])
    # the general NF-k construction (normal quantiles, exact zero) reproduces the table
    assert torch.allclose(quant.nf_code(4), quant.NF4) and (quant.nf_code(3).numel(), quant.nf_code(8).numel()) == (8, 256)
    for b in (2, 3, 8):
        c = quant.nf_code(b)
        assert c[0] == -1 and c[-1] == 1 and (c == 0).sum() == 1 and torch.all(c[1:] > c[:-1])


def test_dynamic_code():
    d = quant.dynamic_code()
    assert d.numel() == 256 and torch.all(d[1:] > d[:-1]) and d[-1] == 1 and (d == 0).sum() == 1
    assert abs(d[d > 0].min().item() - 0.55e-6) < 1e-12  # smallest magnitude: mean of linspace(0.1, 1, 2)·10⁻⁶


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack(bits):
    idx = torch.randint(0, 2 ** bits, (1001,), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    packed = quant.pack(idx, bits)
    assert packed.numel() == -(-1001 * bits // 8)
    assert torch.equal(quant.unpack(packed, bits, 1001), idx.long())
    if bits == 4:  # bitsandbytes' layout: the first element in the high nibble
        assert packed[0].item() == (idx[0].item() << 4 | idx[1].item())


def test_round_trip_error_bound_and_exact_absmax():
    w = W()
    cfg = QuantConfig(double=False)
    q = quant.quantize(w, cfg)
    wd = quant.dequantize(q, cfg, tuple(w.shape))
    blocks, dblocks = w.reshape(-1, 64), wd.reshape(-1, 64)
    absmax = blocks.abs().amax(1)
    assert torch.equal(q["absmax"], absmax)
    half_gap = (quant.NF4[1:] - quant.NF4[:-1]).max() / 2
    assert torch.all((blocks - dblocks).abs() <= half_gap * absmax[:, None] + 1e-6)
    arg = blocks.abs().argmax(1)  # each block's absmax element reconstructs exactly
    assert torch.equal(dblocks.gather(1, arg[:, None]), blocks.gather(1, arg[:, None]))
    # error of the nearest-level rule is the smallest possible per element
    levels = quant.NF4[None, None, :] * absmax[:, None, None]
    best = (blocks[..., None] - levels).abs().amin(-1)
    assert torch.allclose((blocks - dblocks).abs(), best, atol=1e-6)


def test_double_quant_absmax_reconstruction_and_sizes():
    w = W((256, 130))  # 33280 weights -> 520 blocks -> 3 second-level blocks (last one partial)
    n = w.numel()
    q = quant.quantize(w, QuantConfig())
    assert q["codes"].dtype == torch.uint8 and q["codes"].numel() == n // 2
    assert q["absmax"].dtype == torch.uint8 and q["absmax"].numel() == n // 64
    assert q["absmax2"].numel() == -(-(n // 64) // 256) and q["offset"].dim() == 0
    absmax = w.reshape(-1, 64).abs().amax(1)
    assert torch.allclose(q["offset"], absmax.mean())
    code8 = quant.dynamic_code()
    rec = (code8[q["absmax"].long()] * q["absmax2"].repeat_interleave(256)[: n // 64]) + q["offset"]
    centred = (absmax - absmax.mean()).abs()
    step = (code8[1:] - code8[:-1]).max() / 2  # half the widest gap of the dynamic map
    a2 = centred.view(-1)
    bound = step * torch.cat([a2[i:i + 256].max().expand(min(256, a2.numel() - i)) for i in range(0, a2.numel(), 256)])
    assert torch.all((rec - absmax).abs() <= bound + 1e-7)
    wd = quant.dequantize(q, QuantConfig(), tuple(w.shape))
    assert torch.allclose(wd.reshape(-1, 64).abs().amax(1), rec, atol=1e-6)
    stored = sum(t.numel() * t.element_size() for t in q.values())
    assert stored == n // 2 + n // 64 + 4 * q["absmax2"].numel() + 4
    assert abs(quant.bits_per_weight(QuantConfig()) - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes oracle needs CUDA")
def test_matches_bitsandbytes_on_gpu():
    bnb = pytest.importorskip("bitsandbytes")
    w = W((512, 256)).cuda()
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    q = quant.quantize(w, QuantConfig())
    assert (packed.view(-1) != q["codes"]).float().mean() < 1e-3  # ties may round differently in the kernel
    assert torch.allclose(state.offset, q["offset"]) and torch.allclose(state.state2.absmax, q["absmax2"])
    ref = bnb.functional.dequantize_4bit(packed, state)
    assert torch.allclose(quant.dequantize(q, QuantConfig(), tuple(w.shape)).cuda(), ref, atol=1e-2 * w.abs().max())


def test_quant_linear_is_a_frozen_linear():
    lin = torch.nn.Linear(80, 48)
    ql = QuantLinear.from_linear(lin)
    assert isinstance(ql, torch.nn.Linear) and adaptable(ql) == "linear"
    assert "weight" not in ql.state_dict() and [n for n, _ in ql.named_parameters()] == ["bias"]
    x = W((3, 80), 1)
    assert torch.allclose(ql(x), torch.nn.functional.linear(x, ql.weight, lin.bias))
    assert torch.equal(ql.weight, quant.dequantize(quant.quantize(lin.weight), QuantConfig(), (48, 80)))


def _qmodel():
    m = tiny_llama(hidden=64)
    quant_model.quantize_model(m)
    return m


def test_quantize_model_and_bytes():
    m = tiny_llama(hidden=64)
    before = quant.model_bytes(m)
    quant_model.quantize_model(m)
    assert isinstance(m.model.layers[0].mlp.down_proj, QuantLinear) and type(m.lm_head) is torch.nn.Linear
    lin = sum(mod.in_features * mod.out_features for mod in m.modules() if isinstance(mod, QuantLinear))
    assert before - quant.model_bytes(m) > 0.8 * lin * 4 * (1 - 4.13 / 32)


def test_adapters_on_quantised_base_merge_detach_reload(tmp_path):
    m = _qmodel()
    x = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    sd0 = {k: v.clone() for k, v in m.state_dict().items()}
    base_out = run(m, x).detach()
    lorakit.attach(m, {"method": "lora", "targets": "all-linear", "r": 4, "seed": 0})
    assert torch.allclose(run(m, x), base_out)
    with torch.no_grad():
        for _, a in lorakit.adapters(m):
            a.lora_B.weight.normal_(0, 0.05)
    out = run(m, x).detach()
    loss = run(m, x).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if p.requires_grad)
    assert all("lora_" in n for n, p in m.named_parameters() if p.requires_grad)
    sd1 = {k: v.clone() for k, v in m.state_dict().items()}
    with lorakit.merged(m):  # requantised: close, not equal
        assert (run(m, x) - out).abs().max() < 0.2 * out.abs().max()
    assert all(torch.equal(v, sd1[k]) for k, v in m.state_dict().items())  # unmerge restores the packed storage
    lorakit.save_adapter(m, tmp_path / "a")
    fresh = _qmodel()
    lorakit.load_adapter(fresh, tmp_path / "a")
    assert torch.allclose(run(fresh, x), out, atol=1e-6)
    lorakit.detach(m)
    assert all(torch.equal(v, sd0[k]) for k, v in m.state_dict().items())
    # exact 16-bit merge route: dequantise the base first
    quant_model.dequantize_model(fresh)
    assert not any(isinstance(mod, QuantLinear) for mod in fresh.modules())
    with lorakit.merged(fresh):
        assert torch.allclose(run(fresh, x), out, atol=1e-5)


def test_calibrate_grad_sq_is_mean_of_squares():
    m = tiny_llama()
    xs = [torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    loss_fn = lambda mdl, b: run(mdl, b).pow(2).mean()  # noqa: E731
    st = lorakit.calibrate(m, ["model.layers.0.mlp.up_proj"], xs, "gradients", loss_fn=loss_fn)["model.layers.0.mlp.up_proj"]
    gs = []
    for b in xs:
        m.zero_grad()
        loss_fn(m, b).backward()
        gs.append(m.model.layers[0].mlp.up_proj.weight.grad.clone())
    g = torch.stack(gs)
    assert torch.allclose(st["grad"], g.mean(0), atol=1e-7) and torch.allclose(st["grad_sq"], g.pow(2).mean(0), atol=1e-9)
    with pytest.raises(lorakit.ConfigError):
        lorakit.calibrate(_qmodel(), ["model.layers.0.mlp.up_proj"], xs, "gradients", loss_fn=loss_fn)


def test_quant_imports_neither_core_nor_inject():
    """quant is tensor-level (core builds on it): no import of core, inject or targets anywhere in it, not even
    inside a function; model surgery lives in quant_model (re-exported lazily by a module __getattr__). Checked on the source and in a fresh interpreter that
    loads lorakit.quant without running lorakit/__init__."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    src = Path(quant.__file__)
    mods = set()
    for node in ast.walk(ast.parse(src.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            mods.add(node.module or "")
            mods.update(f"{node.module + '.' if node.module else ''}{a.name}" for a in node.names)
    assert not mods & {"core", "inject", "targets", "io"}, mods  # quant_model: the lazy re-export (__getattr__)
    code = f"""
import importlib, sys, types
pkg = types.ModuleType("lorakit"); pkg.__path__ = [{str(src.parent)!r}]; sys.modules["lorakit"] = pkg
q = importlib.import_module("lorakit.quant")
import torch
lin = torch.nn.Linear(64, 8)
ql = q.QuantLinear.from_linear(lin, q.QuantConfig())
snap = q.snapshot(ql); q.set_weight(ql, torch.zeros(8, 64)); q.restore(ql, snap)
assert torch.equal(ql.weight, q.dequantize(q.quantize(lin.weight), q.QuantConfig(), (8, 64)))
bad = sorted(m for m in sys.modules if m in ("lorakit.core", "lorakit.inject", "lorakit.targets", "lorakit.io"))
assert not bad, bad
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_quantize_model_old_import_still_works():
    from lorakit.quant import dequantize_model, quantize_model

    assert quantize_model is quant_model.quantize_model and dequantize_model is quant_model.dequantize_model
    with pytest.raises(AttributeError):
        quant.no_such_function
