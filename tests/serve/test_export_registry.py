"""``lorakit export`` over the whole method registry: every method either exports an adapter that the consumer,
read by its own rules, computes exactly as lorakit does, or is refused with a LorakitError that says why and
what to do instead. Nothing half-right is ever written."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

import lorakit
from helpers import load_base, make_base
from lorakit.core import REGISTRY, get_method
from lorakit.errors import LorakitError
from lorakit.serve.export import GGUF_NAMES, export_adapter
from test_export import _vllm_read

get_method("lora")  # registers every method
METHODS = sorted(REGISTRY)
FORMATS = ("vllm", "gguf")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("exp-reg")
    base = load_base(make_base(d / "base"))
    ids = torch.randint(3, 250, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = base(ids).logits
    return d, base, ids, base_logits, {}


def _options(method: str) -> dict:
    cls = REGISTRY[method]
    opts = {"r": 2} if "r" in {f.name for f in dataclasses.fields(cls.Config)} else {}
    opts.update(cls.example)
    return opts


def _adapter(env, method: str):
    """A saved adapter of ``method`` on the tiny Llama (all linear layers; embeddings for embedding-only methods)
    with every trainable tensor moved off its init, and lorakit's logits with it loaded (unmerged)."""
    d, base, ids, _, cache = env
    if method not in cache:
        cls = REGISTRY[method]
        targets = "all-linear" if "linear" in cls.layers else ["embed_tokens"]
        m = copy.deepcopy(base)
        kw = {}
        if cls.calibration:
            kw = dict(calibration=[ids, ids.flip(0)], loss_fn=lambda mdl, b: mdl(b).logits.float().pow(2).mean())
        lorakit.attach(m, {"method": method, "targets": targets, "seed": 0, **_options(method)}, "a", **kw)
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for _, a in lorakit.adapters(m, "a"):
                for _, p in a.named_parameters():
                    if p.requires_grad and p.is_floating_point():
                        p.add_(torch.randn(p.shape, generator=g) * 0.1)
                a.clear_cache()
        src = d / f"src-{method}"
        lorakit.save_adapter(m, src, "a")
        ref_model = copy.deepcopy(base)
        lorakit.load_adapter(ref_model, src, "x")
        with torch.no_grad():
            ref = ref_model.eval()(ids).logits
        cache[method] = (src, ref)
    return cache[method]


def _unpermute_rows(W: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's converter q/k row order (``convert_hf_to_gguf.py``'s ``permute``: within each head the
    rows are reshaped to (2, d_head/2) and transposed); the inverse transposes back."""
    d = W.shape[0]
    return W.reshape(n_head, d // n_head // 2, 2, *W.shape[1:]).swapaxes(1, 2).reshape(W.shape)


def _gguf_read(path, model):
    """What llama.cpp does with a LoRA GGUF on a Llama base (src/llama-adapter.cpp, llama-graph's build_lora_mm):
    ``general.type=adapter``, ``adapter.type=lora``, for each ``<base tensor>.lora_a``/``.lora_b`` pair
    ``W += (alpha / r) * lora_b @ lora_a`` with r from lora_a's rows; q/k rows are in the converter's order, so they
    are un-permuted here to land on the HF weights."""
    import gguf

    rd = gguf.GGUFReader(str(path))
    f = rd.fields
    s = lambda k: bytes(f[k].parts[f[k].data[0]]).decode()
    assert s("general.type") == "adapter" and s("adapter.type") == "lora"
    assert s("general.architecture") == "llama"
    alpha = float(f["adapter.lora.alpha"].parts[f["adapter.lora.alpha"].data[0]][0])
    t = {x.name: torch.from_numpy(np.array(x.data).reshape([int(v) for v in reversed(x.shape)]).astype(np.float32))
         for x in rd.tensors}
    back = {v: k for k, v in GGUF_NAMES.items()}
    m = copy.deepcopy(model)
    cfg = model.config
    pairs = sorted({n.rsplit(".", 1)[0] for n in t})
    assert len(t) == 2 * len(pairs)
    with torch.no_grad():
        for n in pairs:
            blk, i, kind, w = n.split(".")
            assert blk == "blk" and w == "weight"
            a, b = t[n + ".lora_a"], t[n + ".lora_b"]
            dw = (b @ a) * (alpha / a.shape[0])
            if kind == "attn_q":
                dw = _unpermute_rows(dw, cfg.num_attention_heads)
            elif kind == "attn_k":
                dw = _unpermute_rows(dw, cfg.num_key_value_heads)
            m.get_submodule(f"model.layers.{i}.{back[kind]}").weight.add_(dw)
    return m


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_exports_exactly_or_is_refused_clearly(env, method, fmt):
    d, base, ids, base_logits, _ = env
    src, ref = _adapter(env, method)
    out = d / f"{method}.{'gguf' if fmt == 'gguf' else 'vllm'}"
    try:
        export_adapter(src, out, fmt, model=base)
    except LorakitError as e:
        msg = str(e)
        assert "cannot export" in msg and ("Merge it" in msg or "instead" in msg), msg
        assert not out.exists(), "a refused export must write nothing"
        exported = False
    else:
        exported = True
    cls = REGISTRY[method]
    if not cls.mergeable or method == "dora":  # routing/gating mixtures and DoRA have no LoRA form in either
        assert not exported, f"{method} must be refused for {fmt}"
    if method in ("lora", "pissa", "vera", "adalora", "nola"):  # low-rank methods (PiSSA as rank 2r on W)
        assert exported, f"{method} has an exact LoRA form and must export for {fmt}"
    if not exported:
        return
    assert (ref - base_logits).abs().max() > 1e-2, "the adapter must change the output for the check to mean much"
    with torch.no_grad():
        got = (_vllm_read(out, base) if fmt == "vllm" else _gguf_read(out, base))(ids).logits
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


def _lora(env, name, **opts):
    d, base, _, _, _ = env
    m = copy.deepcopy(base)
    lorakit.attach(m, {"method": "lora", "r": 2, **opts}, "a")
    with torch.no_grad():
        for _, p in m.named_parameters():
            if p.requires_grad:
                p.add_(0.1)
    lorakit.save_adapter(m, d / name, "a")
    return d / name


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case,opts,why", [
    ("lora-bias", {"targets": "all-linear", "lora_bias": True}, "lora_bias"),
    ("bias-all", {"targets": "all-linear", "bias": "all"}, "trains biases"),
    ("embedding", {"targets": ["embed_tokens", "q_proj"]}, "embedding"),
    ("modules-to-save", {"targets": "all-linear", "trainable": ["lm_head"]}, "whole modules"),
])
def test_what_a_lora_file_cannot_carry_is_refused(env, fmt, case, opts, why):
    """Parts of an adapter outside its low-rank factors (a bias on B, trained biases or whole modules, LoRA on an
    embedding) would be dropped silently by a plain LoRA export: each is refused, naming the reason."""
    d, base, _, _, _ = env
    src = _lora(env, case, **opts)
    out = d / f"{case}-{fmt}.out"
    with pytest.raises(LorakitError, match=why) as e:
        export_adapter(src, out, fmt, model=base)
    assert "instead" in str(e.value) and not out.exists()


def test_gguf_refuses_modules_llama_cpp_cannot_name(env):
    d, base, _, _, _ = env
    src = _lora(env, "head", targets=["q_proj", "lm_head"])
    with pytest.raises(LorakitError, match="lm_head' has no llama.cpp LoRA tensor name") as e:
        export_adapter(src, d / "head.gguf", "gguf", model=base)
    assert "instead" in str(e.value) and not (d / "head.gguf").exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_half_precision_base_exports_without_a_false_refusal(env, fmt):
    """The probe check runs in fp32, so a bf16 base (rounding ~1e-2) is not mistaken for an adapter that computes
    something its low-rank form does not; the factors written are the fp32 ones."""
    d, base, ids, _, _ = env
    src, ref = _adapter(env, "lora")
    out = export_adapter(src, d / f"bf16.{fmt}", fmt, model=copy.deepcopy(base).to(torch.bfloat16))
    with torch.no_grad():
        got = (_vllm_read(out, base) if fmt == "vllm" else _gguf_read(out, base))(ids).logits
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)
