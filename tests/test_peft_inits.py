"""PEFT's other LoRA initialisations as LoRA ``init`` options: olora, orthogonal, loftq, eva.

PEFT is the oracle where it is deterministic: OLoRA (a QR) and the orthogonal init (seeded draws) give PEFT's
initial factors and base; files go both ways with identical logits. LoftQ in PEFT needs a CUDA device, so its base is
checked against bitsandbytes' own quantise/dequantise on CPU; EVA against its definition (principal directions)."""
from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import run, tiny_llama
from lorakit.errors import AdapterFileError, ConfigError, LorakitError

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "up_proj"]


def _factors(model, name="default"):
    return {p: (a.lora_A.weight.detach().clone(), a.lora_B.weight.detach().clone())
            for p, a in lorakit.adapters(model, name)}


def _peft_factors(pm):
    out = {}
    for n, m in pm.named_modules():
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
            p = n.replace("base_model.model.", "", 1)
            out[p] = (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone())
    return out


def _base_weights(model):
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in model.state_dict().items()
            if "lora" not in k and ".adapters." not in k}


@pytest.mark.parametrize("init", ["olora", "orthogonal"])
def test_initial_adapter_and_base_equal_peft(init):
    base = tiny_llama()
    torch.manual_seed(7)
    pm = peft.get_peft_model(base, peft.LoraConfig(target_modules=TARGETS, r=4, lora_alpha=8, init_lora_weights=init))
    ref = _peft_factors(pm)
    ref_base = _base_weights(pm.base_model.model)
    m = tiny_llama()
    lorakit.attach(m, {"method": "lora", "targets": TARGETS, "r": 4, "alpha": 8, "init": init, "seed": 7})
    got = _factors(m)
    assert sorted(got) == sorted(ref) and len(got) == 6
    for p in ref:
        for g, r in zip(got[p], ref[p]):
            assert torch.allclose(g, r, atol=1e-6), (init, p)
    base = _base_weights(m)
    for k, v in ref_base.items():
        assert torch.allclose(base[k], v, atol=1e-6), k
    x = torch.randint(0, 64, (2, 9))
    assert (run(pm.eval(), x) - run(m.eval(), x)).abs().max().item() <= 1e-5


def test_olora_is_residual_and_detach_is_bit_exact():
    m = tiny_llama()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randint(0, 64, (2, 9))
    y0 = run(m, x).detach()
    lorakit.attach(m, {"method": "lora", "targets": TARGETS, "r": 4, "alpha": 8, "init": "olora"})
    assert (run(m, x) - y0).abs().max().item() <= 1e-4  # the residual base + s·BA is the original weight
    for p, a in lorakit.adapters(m):
        B = a.lora_B.weight.detach()
        assert torch.allclose(B.t() @ B, torch.eye(4), atol=1e-5)  # B = Q[:, :r] has orthonormal columns
        assert torch.count_nonzero(torch.tril(a.lora_A.weight.detach(), -1)) == 0  # A = R[:r] is upper-triangular
    lorakit.detach(m)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("init", ["olora", "orthogonal", "eva"])
def test_files_both_ways_with_peft(init, tmp_path):
    """A trained lorakit adapter loads in PEFT with the same logits, and PEFT's file loads back here."""
    x = torch.randint(0, 64, (2, 9))
    m = tiny_llama()
    kw = {"calibration": [{"input_ids": torch.randint(0, 64, (2, 12))}]} if init == "eva" else {}
    lorakit.attach(m, {"method": "lora", "targets": TARGETS, "r": 4, "alpha": 8, "init": init, "seed": 3}, **kw)
    with torch.no_grad():
        for _, a in lorakit.adapters(m):
            a.lora_B.weight.add_(0.05 * torch.randn_like(a.lora_B.weight))  # "trained"
    ref = run(m.eval(), x).detach()
    lorakit.save_adapter(m, tmp_path / "lk")
    conf = lorakit.read_adapter_config(tmp_path / "lk")
    assert conf["init_lora_weights"] == init and conf["peft_type"] == "LORA"
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "lk")).eval()
    assert (run(pm, x) - ref).abs().max().item() <= 1e-5
    pm.save_pretrained(str(tmp_path / "peft"))
    import json
    c = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    c.pop("lorakit", None)  # a PEFT-only file: lorakit must read PEFT's own keys
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(c))
    m2 = tiny_llama()
    lorakit.load_adapter(m2, tmp_path / "peft")
    assert lorakit.attachment(m2).method_config().init == init
    assert (run(m2.eval(), x) - ref).abs().max().item() <= 1e-5
    before = tiny_llama().state_dict()
    lorakit.detach(m2)
    for k, v in m2.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_loftq_base_is_bitsandbytes_quantisation_and_approximates_w():
    bnb = pytest.importorskip("bitsandbytes")
    from lorakit.methods._loftq import quant_dequant

    w = torch.randn(24, 40)
    q, st = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(quant_dequant(w, 4), bnb.functional.dequantize_4bit(q, st))
    q8, scb, _ = bnb.functional.int8_vectorwise_quant(w.clone())
    assert torch.equal(quant_dequant(w, 8), bnb.functional.int8_vectorwise_dequant(q8, scb))

    m = tiny_llama()
    orig = {p: mod.weight.detach().clone() for p, mod in m.named_modules() if p.endswith(tuple(TARGETS))}
    lorakit.attach(m, {"method": "lora", "targets": TARGETS, "r": 4, "alpha": 16, "init": "loftq", "loftq_iter": 2})
    for p, a in lorakit.adapters(m):
        W, h = orig[p], dict(lorakit.hosts(m))[p]
        Q = h.base_layer.weight.detach()
        approx = Q + a.scale * (a.lora_B.weight @ a.lora_A.weight).detach()
        # LoftQ: Q + s·BA is a closer approximation of W than the quantised base alone
        assert (approx - W).norm() < (quant_dequant(W, 4) - W).norm()
        # the base is exactly a dequantised NF4 tensor: quantising it again changes nothing
        assert torch.equal(quant_dequant(Q, 4), Q)
    state = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    lorakit.detach(m)
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_loftq_file_rebuilds_the_quantised_base(tmp_path):
    x = torch.randint(0, 64, (2, 9))
    m = tiny_llama()
    lorakit.attach(m, {"method": "lora", "targets": TARGETS, "r": 4, "alpha": 4, "init": "loftq", "loftq_bits": 8})
    ref = run(m.eval(), x).detach()
    lorakit.save_adapter(m, tmp_path / "a")
    conf = lorakit.read_adapter_config(tmp_path / "a")
    assert conf["init_lora_weights"] == "loftq" and conf["loftq_config"] == {"loftq_bits": 8, "loftq_iter": 1}
    import json
    conf.pop("lorakit")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(conf))
    m2 = tiny_llama()
    lorakit.load_adapter(m2, tmp_path / "a")
    assert (run(m2.eval(), x) - ref).abs().max().item() <= 1e-6


def test_eva_rows_are_principal_directions():
    torch.manual_seed(0)
    m = tiny_llama()
    batches = [{"input_ids": torch.randint(0, 64, (2, 16))} for _ in range(3)]
    feats = {}
    hooks = [mod.register_forward_hook(lambda mod, i, o, p=p: feats.setdefault(p, []).append(i[0].reshape(-1, i[0].shape[-1])))
             for p, mod in m.named_modules() if p.endswith("q_proj")]
    with torch.no_grad():
        for b in batches:
            m(**b)
    for h in hooks:
        h.remove()
    y0 = run(m, batches[0]["input_ids"]).detach()
    lorakit.attach(m, {"method": "lora", "targets": ["q_proj"], "r": 3, "init": "eva"}, calibration=batches)
    assert torch.equal(run(m, batches[0]["input_ids"]).detach(), y0)  # B = 0
    for p, a in lorakit.adapters(m):
        X = torch.cat(feats[p]).double()
        X = X - X.mean(0)
        _, _, Vh = torch.linalg.svd(X, full_matrices=False)
        A = a.lora_A.weight.detach().double()
        # the same subspace, each row ± the right singular vector
        assert torch.allclose((A * Vh[:3]).sum(1).abs(), torch.ones(3, dtype=torch.float64), atol=1e-4)


def test_eva_without_calibration_and_bad_options_are_refused():
    with pytest.raises(ConfigError, match="calibration"):
        lorakit.attach(tiny_llama(), {"method": "lora", "targets": ["q_proj"], "init": "eva"})
    with pytest.raises(ConfigError, match="even"):
        lorakit.attach(tiny_llama(), {"method": "lora", "targets": ["q_proj"], "r": 3, "init": "orthogonal"})
    with pytest.raises(ConfigError, match="init"):
        lorakit.attach(tiny_llama(), {"method": "lora", "targets": ["q_proj"], "init": "olorra"})
    with pytest.raises(ConfigError, match="loftq_bits"):
        lorakit.attach(tiny_llama(), {"method": "lora", "targets": ["q_proj"], "init": "loftq", "loftq_bits": 3})
    with pytest.raises(ConfigError, match="linear"):
        lorakit.attach(tiny_llama(), {"method": "lora", "targets": ["embed_tokens"], "init": "olora"})
    m = tiny_llama()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(LorakitError):
        lorakit.attach(m, {"method": "dora", "targets": ["q_proj"], "init": "olora"})  # DoRA keeps its own inits
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())


def test_olora_exports_as_exact_lora_on_the_original_base_and_loftq_is_refused(tmp_path):
    from lorakit.serve.export import export_adapter

    x = torch.randint(0, 64, (2, 9))
    m = tiny_llama()
    lorakit.attach(m, {"method": "lora", "targets": TARGETS, "r": 4, "alpha": 8, "init": "olora"})
    with torch.no_grad():
        for _, a in lorakit.adapters(m):
            a.lora_B.weight.add_(0.05 * torch.randn_like(a.lora_B.weight))
    ref = run(m.eval(), x).detach()
    lorakit.save_adapter(m, tmp_path / "olora")
    export_adapter(tmp_path / "olora", tmp_path / "vllm", "vllm", model=tiny_llama())
    conf = lorakit.read_adapter_config(tmp_path / "vllm")
    assert conf["r"] == 8 and conf.get("init_lora_weights") in (True, None)  # rank 2r, a plain LoRA
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "vllm")).eval()  # on the ORIGINAL base
    assert (run(pm, x) - ref).abs().max().item() <= 1e-5

    m2 = tiny_llama()
    lorakit.attach(m2, {"method": "lora", "targets": TARGETS, "r": 4, "alpha": 4, "init": "loftq"})
    lorakit.save_adapter(m2, tmp_path / "loftq")
    with pytest.raises(LorakitError, match="replaces the base weights.*quantised"):
        export_adapter(tmp_path / "loftq", tmp_path / "vllm2", "vllm", model=tiny_llama())


def test_calibration_kind_reads_the_declared_init():
    from lorakit.inject import calibration_kind

    assert calibration_kind({"method": "lora", "init": "eva"}) == "activations"
    assert calibration_kind({"method": "lora", "overrides": {"q_proj": {"init": "eva"}}}) == "activations"
    assert calibration_kind({"method": "lora", "init": "olora"}) is None
    assert calibration_kind({"method": "lora_ga"}) == "gradients"  # class-level declarations still count
    assert calibration_kind({"method": "pissa"}) is None  # LoRA's inits are not inherited
