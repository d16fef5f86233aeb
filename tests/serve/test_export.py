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
