"""lorakit.formats.peft_lora: the one reader/writer of PEFT LoRA configs resolves each module's (r, alpha, scale)
exactly as PEFT's own LoraModel does (PEFT is the oracle), and every consumer goes through it."""
from __future__ import annotations

import json

import pytest
import torch

import lorakit
from conftest import MLP, run, tiny_llama
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.formats.peft_lora import PeftLoraConfig, pattern_key, read_lora, write_lora

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
CASES = {
    "patterns": dict(r=4, lora_alpha=8, rank_pattern={"down_proj": 2, r"model\.layers\.1\.self_attn\.k_proj": 6},
                     alpha_pattern={"v_proj": 3, "layers.0.self_attn.o_proj": 5}),
    "rslora+patterns": dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"o_proj": 2, "layers.1.*v_proj": 8},
                            alpha_pattern={"o_proj": 3}),
    # the same key in both patterns, and alpha keys whose first match differs from rank_pattern's order: PEFT looks
    # rank and alpha up independently, each in its own mapping's order
    "shared-keys-order": dict(r=4, lora_alpha=8, rank_pattern={"q_proj": 2, "layers.0.self_attn.v_proj": 6},
                              alpha_pattern={"layers.0.self_attn.q_proj": 1, "q_proj": 16, "v_proj": 2}),
}


def _peft_scales(case):
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=TARGETS, **CASES[case]))
    out = {}
    for path, m in pm.base_model.model.named_modules():
        if isinstance(m, peft.tuners.lora.LoraLayer):
            out[path] = (m.r["default"], m.lora_alpha["default"], m.scaling["default"])
    return pm, out


@pytest.mark.parametrize("case", sorted(CASES))
def test_resolve_equals_peft(case):
    pm, want = _peft_scales(case)
    cfg = PeftLoraConfig.from_dict(pm.peft_config["default"].to_dict())
    assert want
    for path, (r, alpha, scale) in want.items():
        got = cfg.resolve(path)
        assert (got.r, got.alpha) == (r, alpha), path
        assert got.scale == pytest.approx(scale, rel=1e-12), path


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_adapter_scales_equal_peft(case, tmp_path):
    """The loaded lorakit adapters carry PEFT's per-module scale, and the logits agree."""
    torch.manual_seed(0)
    pm, want = _peft_scales(case)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    x = torch.randint(0, 64, (2, 7))
    ref = run(pm.eval(), x).detach()
    pm.save_pretrained(str(tmp_path))
    m = tiny_llama()
    lorakit.load_adapter(m, tmp_path)
    got = {p: (a.cfg.r, a.scale) for p, a in lorakit.adapters(m)}
    assert set(got) == set(want)
    for p, (r, _alpha, scale) in want.items():
        assert got[p][0] == r and got[p][1] == pytest.approx(scale, rel=1e-12), p
    assert (run(m.eval(), x) - ref).abs().max().item() <= 1e-5


def test_pattern_key_is_peft_rule():
    from peft.utils.other import get_pattern_key

    keys = ["q_proj", r"layers\.1\..*", "self_attn.k_proj", "proj"]
    for path in ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "model.layers.0.self_attn.k_proj",
                 "q_proj", "model.xq_proj", "model.layers.0.mlp.down_proj", "model.embed"]:
        want = get_pattern_key(keys, path)
        assert pattern_key(keys, path) == (None if want == path and want not in keys else want), path


def test_mixture_experts_honour_rslora_and_patterns(tmp_path):
    """MeteoRA's experts loaded from PEFT LoRAs get each module's own PEFT scale (rsLoRA and alpha_pattern)."""
    from lorakit.methods._mixture import load_lora_experts, read_lora_factors

    dirs, peft_models = [], []
    for t, extra in enumerate([dict(use_rslora=True), dict(alpha_pattern={"lin1": 7.0}, use_rslora=True)]):
        torch.manual_seed(t)
        pm = peft.get_peft_model(MLP(), peft.LoraConfig(target_modules=["lin0", "lin1"], r=2, lora_alpha=4, **extra))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.3)
        pm.save_pretrained(str(tmp_path / f"t{t}"))
        dirs.append(tmp_path / f"t{t}")
        peft_models.append(pm)
    torch.manual_seed(0)
    m = MLP()
    lorakit.attach(m, {"method": "meteora", "targets": ["lin0", "lin1"], "r": 2, "num_experts": 2, "seed": 0})
    load_lora_experts(m, dirs)
    for path, a in lorakit.adapters(m):
        s = a.expert_scale()
        for e, pm in enumerate(peft_models):
            layer = pm.base_model.model.get_submodule(path)
            want = layer.lora_B["default"].weight * layer.scaling["default"]
            se = float(s[e]) if isinstance(s, torch.Tensor) else float(s)
            torch.testing.assert_close(a.experts_B[e] * se, want.detach(), rtol=1e-6, atol=1e-7)
        # the same factors as read_lora_factors (what X-LoRA loads)
        A, sB = read_lora_factors(dirs[1])[path]
        torch.testing.assert_close(sB, (peft_models[1].base_model.model.get_submodule(path).lora_B["default"].weight
                                        * peft_models[1].base_model.model.get_submodule(path).scaling["default"]).detach())


def test_write_lora_round_trips_and_loads_in_peft(tmp_path):
    g = torch.Generator().manual_seed(0)
    ranks = {"lin0": 2, "lin1": 3}
    alphas = {"lin0": 4.0, "lin1": 1.5}
    factors = {"lin0": (torch.randn(2, 12, generator=g), torch.randn(16, 2, generator=g)),
               "lin1": (torch.randn(3, 16, generator=g), torch.randn(16, 3, generator=g))}
    cfg = PeftLoraConfig.for_modules(ranks, alphas, use_rslora=True)
    assert (cfg.r, cfg.rank_pattern, cfg.alpha_pattern) == (3, {"lin0": 2}, {"lin0": 4.0})
    write_lora(tmp_path, cfg, factors)
    back, got = read_lora(tmp_path, fold_scale=True)
    assert back.to_dict() == json.loads(json.dumps(cfg.to_dict()))
    torch.manual_seed(0)
    pm = peft.PeftModel.from_pretrained(MLP(), str(tmp_path))
    for p, (A, B) in factors.items():
        lay = pm.base_model.model.get_submodule(p)
        assert lay.scaling["default"] == pytest.approx(cfg.scale(p))
        torch.testing.assert_close(got[p][1], B * cfg.scale(p))
        torch.testing.assert_close(lay.lora_A["default"].weight, A)


@pytest.mark.parametrize("bad,msg", [
    ({"r": 0}, "positive rank"), ({"r": "8"}, "r must be a number"), ({"lora_alpha": True}, "lora_alpha"),
    ({"rank_pattern": {"q_proj": 2.5}}, "integer"), ({"rank_pattern": ["q_proj"]}, "mapping"),
    ({"alpha_pattern": {"q_proj(": 2}}, "regular expression"), ({"use_rslora": "yes"}, "use_rslora"),
    ({"peft_type": "VERA"}, "peft_type"), ({"target_modules": 3}, "target_modules"),
])
def test_bad_configs_raise_config_error(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        PeftLoraConfig.from_dict({"peft_type": "LORA", "r": 4, "lora_alpha": 8, **bad})


def test_bad_pattern_in_file_is_refused_on_load(tmp_path):
    pm = peft.get_peft_model(MLP(), peft.LoraConfig(target_modules=["lin0"], r=2))
    pm.save_pretrained(str(tmp_path))
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    conf["rank_pattern"] = {"lin0": "two"}
    (tmp_path / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(AdapterFileError, match="rank_pattern"):
        lorakit.load_adapter(MLP(), tmp_path)
