"""Adapters created by PEFT itself load in lorakit with the same logits (and back), including regex targets,
per-module ranks/alphas, biases and modules_to_save."""
from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import MLP, run, tiny_gemma, tiny_llama

peft = pytest.importorskip("peft")


def _randomize_peft(pm, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _peft_to_lorakit(make, peft_cfg, x, tmp_path, seed=0):
    torch.manual_seed(seed)
    pm = peft.get_peft_model(make(), peft_cfg)
    _randomize_peft(pm)
    pm.eval()
    ref = run(pm, x).detach()
    pm.save_pretrained(str(tmp_path / "peft"))
    torch.manual_seed(seed)
    model = make()
    lorakit.load_adapter(model, tmp_path / "peft")
    model.eval()
    out = run(model, x).detach()
    return ref, out, model


CASES = {
    "regex-targets": dict(target_modules=r".*\.(q_proj|v_proj)", r=4, lora_alpha=8),
    "rank-alpha-pattern": dict(target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], r=4, lora_alpha=8,
                               rank_pattern={"down_proj": 2, r"model\.layers\.1\.self_attn\.k_proj": 6},
                               alpha_pattern={"v_proj": 3}),
    "rslora-dropout": dict(target_modules="all-linear", r=3, lora_alpha=5, use_rslora=True, lora_dropout=0.1),
    "dora": dict(target_modules=["q_proj", "o_proj", "up_proj"], r=4, lora_alpha=4, use_dora=True),
    "layers-to-transform": dict(target_modules=["q_proj", "v_proj"], r=2, layers_to_transform=[1],
                                layers_pattern="layers"),
    "exclude": dict(target_modules="all-linear", exclude_modules=r".*mlp.*", r=2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_with_same_logits(case, tmp_path):
    x = torch.randint(0, 64, (2, 9))
    ref, out, _ = _peft_to_lorakit(tiny_llama, peft.LoraConfig(**CASES[case]), x, tmp_path)
    assert (ref - out).abs().max().item() <= 1e-5


def test_bias_and_modules_to_save(tmp_path):
    x = torch.randn(5, 12)
    cfg = peft.LoraConfig(target_modules=["lin0", "out"], r=2, bias="lora_only", modules_to_save=["lin1"])
    ref, out, model = _peft_to_lorakit(lambda: MLP(), cfg, x, tmp_path)
    assert (ref - out).abs().max().item() <= 1e-5
    # and back: lorakit's file loads in PEFT with the same logits
    lorakit.save_adapter(model, tmp_path / "lk")
    torch.manual_seed(0)
    pm = peft.PeftModel.from_pretrained(MLP(), str(tmp_path / "lk")).eval()
    assert (run(pm, x) - ref).abs().max().item() <= 1e-5


def test_bias_all(tmp_path):
    x = torch.randn(5, 12)
    cfg = peft.LoraConfig(target_modules=["lin0"], r=2, bias="all")
    ref, out, _ = _peft_to_lorakit(lambda: MLP(), cfg, x, tmp_path)
    assert (ref - out).abs().max().item() <= 1e-5


def test_lorakit_overrides_become_rank_pattern(tmp_path):
    x = torch.randint(0, 64, (2, 9))
    torch.manual_seed(0)
    m = tiny_llama()
    lorakit.attach(m, {"method": "lora", "targets": ["q_proj", "v_proj"], "r": 4, "alpha": 8,
                       "overrides": {r".*layers\.0\.self_attn\.q_proj": {"r": 2, "alpha": 2}}})
    with torch.no_grad():
        for _, a in lorakit.adapters(m):
            a.lora_B.weight.normal_(std=0.1)
    ref = run(m.eval(), x).detach()
    lorakit.save_adapter(m, tmp_path / "a")
    conf = lorakit.read_adapter_config(tmp_path / "a")
    assert conf["rank_pattern"] == {"model.layers.0.self_attn.q_proj": 2}
    torch.manual_seed(0)
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a")).eval()
    assert (run(pm, x) - ref).abs().max().item() <= 1e-5


def test_pissa_saved_as_plain_lora_on_original_base(tmp_path):
    x = torch.randint(0, 64, (2, 9))
    torch.manual_seed(0)
    m = tiny_llama()
    lorakit.attach(m, {"method": "pissa", "targets": ["q_proj", "v_proj", "up_proj"], "r": 4, "alpha": 4})
    with torch.no_grad():
        for _, a in lorakit.adapters(m):
            a.lora_A.weight.add_(torch.randn_like(a.lora_A.weight) * 0.05)
            a.lora_B.weight.add_(torch.randn_like(a.lora_B.weight) * 0.05)
    ref = run(m.eval(), x).detach()
    lorakit.save_adapter(m, tmp_path / "lora", as_lora=True)
    conf = lorakit.read_adapter_config(tmp_path / "lora")
    assert conf["r"] == 8 and conf["init_lora_weights"] is True
    torch.manual_seed(0)
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "lora")).eval()  # ORIGINAL base
    assert (run(pm, x) - ref).abs().max().item() <= 1e-5
    torch.manual_seed(0)
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path / "lora")
    assert lorakit.attached(fresh)["default"]["config"].method == "lora"
    assert (run(fresh.eval(), x) - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("make", [tiny_gemma, lambda: tiny_gemma(tie_word_embeddings=True),
                                  lambda: tiny_llama(tie_word_embeddings=True)], ids=["scaled", "scaled-tied", "tied"])
def test_peft_embedding_lora_on_scaled_and_tied_embeddings(make, tmp_path):
    """PEFT scales an embedding LoRA's output by the module's embed_scale and, unmerged, changes the input side of
    tied weights only: lorakit computes the same from PEFT's file, and PEFT the same from lorakit's."""
    x = torch.randint(0, 64, (2, 9))
    cfg = peft.LoraConfig(target_modules=["embed_tokens", "q_proj"], r=4, lora_alpha=8)
    ref, out, model = _peft_to_lorakit(make, cfg, x, tmp_path)
    assert (ref - out).abs().max().item() <= 1e-5
    torch.manual_seed(0)
    assert (run(make(), x) - ref).abs().max().item() > 1e-2  # the adapter matters
    lorakit.save_adapter(model, tmp_path / "lk")
    torch.manual_seed(0)
    pm = peft.PeftModel.from_pretrained(make(), str(tmp_path / "lk")).eval()
    assert (run(pm, x) - ref).abs().max().item() <= 1e-5


def test_peft_saved_embedding_weight_of_another_base_is_refused(tmp_path):
    """PEFT stores the full base embedding next to an embedding LoRA; lorakit accepts it only if it is this model's."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    pm = peft.get_peft_model(tiny_gemma(), peft.LoraConfig(target_modules=["embed_tokens"], r=2))
    pm.save_pretrained(str(tmp_path / "p"))
    f = tmp_path / "p" / "adapter_model.safetensors"
    sd = load_file(str(f))
    key = next(k for k in sd if k.endswith("embed_tokens.base_layer.weight"))
    sd[key] = sd[key] + 1.0
    save_file(sd, str(f))
    m = tiny_gemma()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(lorakit.AdapterFileError, match="another base"):
        lorakit.load_adapter(m, tmp_path / "p")
    assert not lorakit.attached(m)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
