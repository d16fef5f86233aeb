"""bitsandbytes bases (Linear4bit / Linear8bitLt) through the weight-I/O hook, with PEFT's bnb LoRA layers as the
oracle. Runs where bitsandbytes imports and has a backend for this device (its CPU backend here); otherwise the
module is skipped saying what is missing. The error path (a bitsandbytes without a backend, a packed layer
nobody can read) is tested by faking the failure."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import lorakit
from lorakit import quant
from lorakit.core import LayerView, adaptable
from lorakit.errors import TargetError

from conftest import tiny_llama

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install bitsandbytes)")


def _cpu_backend() -> str | None:
    try:
        w = torch.linspace(-1, 1, 128).view(2, 64)
        q, st = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
        bnb.functional.dequantize_4bit(q, st)
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(w.half())
        bnb.functional.int8_vectorwise_dequant(cb, scb)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


_why = _cpu_backend()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"bitsandbytes {getattr(bnb, '__version__', '?')} has no "
                                f"working CPU backend here ({_why})")
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(seed=0, hidden=64).save_pretrained(d)  # bnb's CPU repacking needs in_features >= its block (64)
    return d


def quantized(base_dir, kind, cpu_repack=False):
    """The saved tiny Llama loaded by transformers with a BitsAndBytesConfig. ``cpu_repack=False`` keeps
    bitsandbytes' 4-bit storage in its standard layout: its AVX512-BF16 CPU path otherwise repacks each weight on
    the first eval forward, a layout PEFT's merge (``dequantize_4bit`` on the raw storage) cannot read."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                              bnb_4bit_use_double_quant=True) if kind == "4bit" else
           BitsAndBytesConfig(load_in_8bit=True))
    m = AutoModelForCausalLM.from_pretrained(str(base_dir), quantization_config=cfg, device_map="cpu",
                                             dtype=torch.float32).eval()
    if not cpu_repack:
        for layer in m.modules():
            if isinstance(layer, bnb.nn.Linear4bit):
                layer.support_avx512bf16_for_cpu = False
    return m


def _ids():
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(5))


def _packed(model):
    """Every bnb layer's stored weight: the dequantised 4-bit weight (codes x constants, whatever layout bnb keeps
    them in), the 8-bit codes and row scales."""
    from lorakit.integrations.bnb import dense_weight

    out = {}
    for p, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            out[p] = [dense_weight(m).clone()]
        elif isinstance(m, bnb.nn.Linear8bitLt):
            out[p] = [m.weight.data.clone(), (m.state.SCB if m.state.SCB is not None else m.weight.SCB).clone()]
    return out


def _same_packed(a, b):
    return a.keys() == b.keys() and all(all(torch.equal(x, y) for x, y in zip(a[k], b[k])) for k in a)


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_layers_are_recognised_generically(base_dir, kind):
    m = quantized(base_dir, kind)
    layer = m.model.layers[0].mlp.down_proj
    assert type(layer).__module__.startswith("bitsandbytes") and adaptable(layer) == "linear"
    view = LayerView(layer)
    assert (view.d_out, view.d_in) == (layer.out_features, layer.in_features)
    assert layer.weight.shape != (view.d_out, view.d_in) or kind == "8bit"  # 4-bit storage is packed
    dense = quant.get_weight(layer)
    ref = tiny_llama(seed=0, hidden=64).model.layers[0].mlp.down_proj.weight
    assert dense.shape == ref.shape
    rel = float((dense.float() - ref.detach()).norm() / ref.detach().norm())
    assert 0 < rel < (0.15 if kind == "4bit" else 0.02)  # quantised, and close to the float weight
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the dense weight is the one the layer computes with
        want, got = layer(x).float(), nn.functional.linear(x, dense.float())
    assert float((got - want).norm() / want.norm()) < 2e-2  # bnb CPU kernels compute in reduced precision
    lorakit.attach(m, {"method": "lora", "targets": "all-linear", "r": 2})
    assert len(lorakit.attachment(m).paths) == 14  # 7 projections x 2 layers, the head excluded


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_peft_parity_unmerged_merged_and_exact_restore(base_dir, kind, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    pm = get_peft_model(quantized(base_dir, kind), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                               init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path / "peft")
    ids = _ids()
    plain = quantized(base_dir, kind)
    with torch.no_grad():
        y_base = plain(ids).logits
        y_peft = pm(ids).logits
    m = quantized(base_dir, kind)
    lorakit.load_adapter(m, tmp_path / "peft")
    before = _packed(m)
    with torch.no_grad():
        y = m(ids).logits
        assert torch.allclose(y, y_peft, atol=1e-5), (y - y_peft).abs().max()
        assert (y - y_base).abs().max() > 1e-2  # the adapter does something
        with lorakit.merged(m):
            y_merged = m(ids).logits
            merged_store = _packed(m)
        pm.merge_adapter()
        y_peft_merged = pm(ids).logits
        # the same requantised storage as PEFT's merge (same codes and constants), hence the same outputs
        peft_store = {p.replace("base_model.model.", "", 1): v
                      for p, v in _packed(pm).items()}
        assert _same_packed(merged_store, {p: peft_store[p] for p in merged_store})
        assert torch.allclose(y_merged, y_peft_merged, atol=1e-5)
        assert not _same_packed(merged_store, before)
        # unmerge restores the storage bit-exactly (PEFT's unmerge requantises again; ours does not)
        assert _same_packed(_packed(m), before)
        assert torch.equal(m(ids).logits, y)
    lorakit.detach(m)
    assert _same_packed(_packed(m), _packed(plain))
    with torch.no_grad():
        assert torch.equal(m(ids).logits, y_base)
    assert type(m.model.layers[0].self_attn.q_proj) is type(plain.model.layers[0].self_attn.q_proj)


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_lorakit_file_on_a_bnb_base_loads_in_peft(base_dir, kind, tmp_path):
    from peft import PeftModel

    m = quantized(base_dir, kind)
    lorakit.attach(m, {"method": "lora", "targets": TARGETS, "r": 4, "alpha": 16, "seed": 3})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, a in lorakit.adapters(m):
            a.lora_B.weight.copy_(torch.randn(a.lora_B.weight.shape, generator=g) * 0.1)
    lorakit.save_adapter(m, tmp_path / "ours")
    pm = PeftModel.from_pretrained(quantized(base_dir, kind), str(tmp_path / "ours")).eval()
    ids = _ids()
    with torch.no_grad():
        assert torch.allclose(m(ids).logits, pm(ids).logits, atol=1e-5)


def test_importing_lorakit_does_not_import_bitsandbytes():
    code = "import sys, lorakit, lorakit.quant, lorakit.inject; print('bitsandbytes' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_missing_backend_is_a_clear_error_and_changes_nothing(base_dir, monkeypatch):
    from lorakit.integrations import bnb as lk_bnb

    m = quantized(base_dir, "4bit")
    before = _packed(m)
    monkeypatch.setitem(lk_bnb._PROBED, ("4bit", "cpu"), "NotImplementedError: no kernel for dequantize_4bit")
    with pytest.raises(TargetError, match=r"bitsandbytes .* cannot \(de\)quantise 4bit weights on cpu"):
        lorakit.attach(m, {"method": "lora", "targets": TARGETS})
    monkeypatch.undo()
    assert not lorakit.attached(m) and _same_packed(_packed(m), before)
    assert type(m.model.layers[0].self_attn.q_proj) is bnb.nn.Linear4bit


def test_packed_storage_without_a_reader_is_refused():
    class Packed(nn.Linear):  # a foreign quantised linear nobody registered: int8 codes in .weight
        def __init__(self):
            super().__init__(8, 4)
            self.weight = nn.Parameter(torch.zeros(4, 2, dtype=torch.int8), requires_grad=False)

    with pytest.raises(TargetError, match="no reader"):
        LayerView(Packed())


def test_bnb_cpu_repacked_storage_is_read_and_restored(base_dir):
    """bitsandbytes' CPU fast path repacks a 4-bit weight on its first eval forward; lorakit reads that layout
    (codes x bf16 constants, what the kernel computes with) and merged()/detach still restore it exactly."""
    m = quantized(base_dir, "4bit", cpu_repack=True)
    layer = m.model.layers[0].mlp.down_proj
    if not layer.support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack here")
    before = quant.get_weight(layer).clone()
    ids = _ids()
    with torch.no_grad():
        y0 = m(ids).logits
    assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    after = quant.get_weight(layer)
    assert 0 < float((after - before).norm() / before.norm()) < 1e-2  # only the constants' bf16 rounding
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # what the layer computes with (its kernel works in bf16: ~0.3% here)
        y = layer(x)
        assert float((y - x @ after.t()).norm() / y.norm()) < 1e-2
    lorakit.attach(m, {"method": "lora", "targets": TARGETS, "r": 4, "seed": 0})
    with torch.no_grad():
        for _, a in lorakit.adapters(m):
            a.lora_B.weight.normal_(0, 0.05)
        y1 = m(ids).logits
        stored = _packed(m)
        with lorakit.merged(m):
            y_merged = m(ids).logits
        assert _same_packed(_packed(m), stored)
        assert torch.equal(m(ids).logits, y1)
        assert float((y_merged - y1).norm() / (y1 - y0).norm()) < 0.5  # requantised: close, not exact
        lorakit.detach(m)
        assert torch.equal(m(ids).logits, y0)
