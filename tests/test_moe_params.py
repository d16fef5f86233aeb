"""LoRA on parameters by name (PEFT's ``target_parameters``): the fused 3-D expert weights of transformers' MoE
models (Qwen3-MoE (E, out, in), gpt-oss-style (E, in, out) with ``is_transposed``). PEFT is the oracle: its files load
with identical logits and ours load in PEFT; merges are exact; detach restores the base bit for bit."""
from __future__ import annotations

import json

import pytest
import torch

import lorakit
from conftest import run
from lorakit.errors import ConfigError, LorakitError, TargetError

peft = pytest.importorskip("peft")

PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def tiny_qwen3_moe(seed=0):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    c = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                       num_experts_per_tok=2, max_position_embeddings=64)
    return Qwen3MoeForCausalLM(c).eval()


def tiny_mixtral(seed=0):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    c = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    return MixtralForCausalLM(c).eval()


MODELS = {"qwen3_moe": tiny_qwen3_moe, "mixtral": tiny_mixtral}


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_peft_files_both_ways_with_identical_logits(arch, tmp_path):
    make = MODELS[arch]
    x = torch.randint(0, 64, (2, 9))
    pm = peft.get_peft_model(make(), peft.LoraConfig(target_modules=["q_proj"], target_parameters=PARAMS, r=2,
                                                     lora_alpha=4))
    _randomize(pm)
    pm.eval()
    ref = run(pm, x).detach()
    pm.save_pretrained(str(tmp_path / "peft"))
    m = make()
    y0 = run(m, x).detach()
    lorakit.load_adapter(m, tmp_path / "peft")
    att = lorakit.attachment(m)
    assert len(att.param_targets) == 4 and len(att.paths) == 2
    out = run(m.eval(), x).detach()
    assert (out - ref).abs().max().item() <= 1e-5 and (out - y0).abs().max().item() > 1e-3
    lorakit.save_adapter(m, tmp_path / "lk")
    conf = lorakit.read_adapter_config(tmp_path / "lk")
    assert conf["peft_type"] == "LORA" and len(conf["target_parameters"]) == 4
    pm2 = peft.PeftModel.from_pretrained(make(), str(tmp_path / "lk")).eval()
    assert (run(pm2, x) - ref).abs().max().item() <= 1e-5
    # our own file round trip (the lorakit block) too
    m3 = make()
    lorakit.load_adapter(m3, tmp_path / "lk")
    assert (run(m3.eval(), x) - ref).abs().max().item() <= 1e-6


def test_train_merge_detach_exact():
    m = tiny_qwen3_moe()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randint(0, 64, (2, 9))
    y0 = run(m, x).detach()
    lorakit.attach(m, {"method": "lora", "target_parameters": ["mlp.experts.gate_up_proj"], "r": 2, "alpha": 2})
    assert torch.equal(run(m, x).detach(), y0)  # B = 0
    train = [n for n, p in m.named_parameters() if p.requires_grad]
    assert len(train) == 4 and all("lora_" in n for n in train)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=200.0)
    for _ in range(2):
        opt.zero_grad()
        run(m, x).float().pow(2).mean().backward()
        opt.step()
    assert all(p.grad.abs().sum() > 0 for p in m.parameters() if p.requires_grad)  # gradients reach every factor
    out = run(m, x).detach()
    assert (out - y0).abs().max().item() > 1e-4
    with lorakit.merged(m):
        assert (run(m, x).detach() - out).abs().max().item() <= 1e-5
    assert torch.equal(run(m, x).detach(), out)
    # merged weight = W + per-expert s·B_e A_e (PEFT's layout: A rows expert-major, B columns rank-major)
    a = next(a for _, a in lorakit.adapters(m))
    A = a.lora_A.weight.detach().reshape(4, 2, 32)
    B = a.lora_B.weight.detach().reshape(32, 2, 4)
    e = 3
    want = (B[:, :, e] @ A[e]) * a.scale
    assert torch.allclose(a.delta_weight().detach()[e], want, atol=1e-6)
    lorakit.detach(m)
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_merge_and_unload_matches_unmerged():
    m = tiny_mixtral()
    x = torch.randint(0, 64, (2, 9))
    lorakit.attach(m, {"method": "lora", "target_parameters": PARAMS, "r": 2})
    _randomize(m)
    out = run(m, x).detach()
    lorakit.merge_and_unload(m)
    assert not list(lorakit.hosts(m))
    assert type(m.model.layers[0].mlp.experts).__name__.endswith("Experts")
    assert (run(m, x).detach() - out).abs().max().item() <= 1e-5


def tiny_gpt_oss(seed=0):
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    c = GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                     max_position_embeddings=64, layer_types=["full_attention", "full_attention"],
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    m = GptOssForCausalLM(c).eval()
    with torch.no_grad():  # transformers leaves the expert biases at zero: give them values
        for n, p in m.named_parameters():
            if n.endswith("_bias"):
                p.normal_(0, 0.1)
    return m


def test_transposed_experts_gpt_oss_peft_parity(tmp_path):
    """gpt-oss stores experts as (E, in, out) and declares ``is_transposed``: the view reads the flag as PEFT does."""
    x = torch.randint(0, 64, (2, 9))
    m = tiny_gpt_oss()
    ex = m.model.layers[0].mlp.experts
    assert ex.is_transposed and tuple(ex.down_proj.shape) == (4, 16, 32)
    pm = peft.get_peft_model(tiny_gpt_oss(), peft.LoraConfig(target_modules=[], target_parameters=PARAMS, r=2))
    _randomize(pm)
    pm.eval()
    ref = run(pm, x).detach()
    pm.save_pretrained(str(tmp_path / "peft"))
    lorakit.load_adapter(m, tmp_path / "peft")
    d = next(a for _, a in lorakit.adapters(m) if a.view.param == "down_proj")
    assert (d.view.d_in, d.view.d_out, d.view.experts) == (16, 32, 4)
    out = run(m.eval(), x).detach()
    assert (out - ref).abs().max().item() <= 1e-5
    with lorakit.merged(m):
        assert (run(m, x).detach() - out).abs().max().item() <= 1e-5


def test_refusals():
    m = tiny_qwen3_moe()
    with pytest.raises(TargetError, match="matched no parameter"):
        lorakit.attach(m, {"method": "lora", "target_parameters": ["mlp.experts.nope"]})
    with pytest.raises(ConfigError, match="dropout"):
        lorakit.attach(m, {"method": "lora", "target_parameters": PARAMS, "dropout": 0.1})
    with pytest.raises(LorakitError, match="param"):
        lorakit.attach(m, {"method": "dora", "target_parameters": PARAMS})
    assert not list(lorakit.hosts(m))
    lorakit.attach(m, {"method": "lora", "target_parameters": ["mlp.experts.gate_up_proj"]}, "a")
    with pytest.raises(ConfigError, match="same set"):
        lorakit.attach(m, {"method": "lora", "target_parameters": PARAMS}, "b")
    lorakit.attach(m, {"method": "lora", "target_parameters": ["mlp.experts.gate_up_proj"]}, "b")  # same set: fine
    with pytest.raises(LorakitError, match="per expert"):
        next(a for _, a in lorakit.adapters(m)).lowrank()


def test_export_refuses_expert_lora_clearly(tmp_path):
    from lorakit.serve.export import export_adapter

    m = tiny_qwen3_moe()
    lorakit.attach(m, {"method": "lora", "targets": ["q_proj"], "target_parameters": PARAMS, "r": 2})
    lorakit.save_adapter(m, tmp_path / "a")
    for fmt in ("vllm", "gguf"):
        with pytest.raises(ConfigError, match="target_parameters.*merge_and_unload"):
            export_adapter(tmp_path / "a", tmp_path / f"out_{fmt}", fmt, model=tiny_qwen3_moe())
        assert not (tmp_path / f"out_{fmt}").exists()
