"""LoRA extraction (lorakit.extract_lora / `lorakit extract`): a constructed base/tuned pair whose difference has a
known low rank per layer; PEFT is the oracle for what the written file computes."""
from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit.cli import main as cli_main
from lorakit.errors import ConfigError
from lorakit.extract import energy_rank, load_pretrained

from conftest import tiny_gpt2, tiny_llama

# per layer: the singular values of the constructed difference (its true rank = their count)
SPECTRA = {
    "model.layers.0.self_attn.q_proj": [3.0, 2.0],
    "model.layers.0.mlp.down_proj": [4.0, 0.5, 0.25],
    "model.layers.1.self_attn.v_proj": [2.0],
    "lm_head": [1.5, 1.0, 0.5, 0.25],
}


def _orth(n, k, g):
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return q


def tuned_pair(bias_on: str | None = None):
    """(base, tuned, {path: ΔW}): ΔW = U diag(s) Vᵀ with the spectra above; nothing else changes."""
    base, tuned = tiny_llama(seed=0), tiny_llama(seed=0)
    g = torch.Generator().manual_seed(7)
    deltas = {}
    with torch.no_grad():
        for path, s in SPECTRA.items():
            w = tuned.get_submodule(path).weight
            d = _orth(w.shape[0], len(s), g) @ torch.diag(torch.tensor(s, dtype=torch.float64)) \
                @ _orth(w.shape[1], len(s), g).T
            w.add_(d.float())
            deltas[path] = d
    return base, tuned, deltas


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def test_exact_recovery_at_true_rank_and_truncation_is_optimal():
    base, tuned, deltas = tuned_pair()
    ex = lorakit.extract_lora(base, tuned, rank=4)
    assert set(ex.factors) == set(SPECTRA)  # only the layers that differ
    assert not ex.skipped
    for p, s in SPECTRA.items():
        A, B = ex.factors[p]
        assert ex.ranks[p] == 4 and A.shape == (4, deltas[p].shape[1]) and B.shape == (deltas[p].shape[0], 4)
        # the stored delta (the actual difference of the float32 weights) is recovered exactly at rank >= true rank
        true = (tuned.get_submodule(p).weight - base.get_submodule(p).weight).double()
        assert _rel((B @ A).double(), true) < 1e-5
    ex2 = lorakit.extract_lora(base, tuned, rank=1)
    for p, s in SPECTRA.items():
        A, B = ex2.factors[p]
        # Eckart-Young: the rank-1 error is the tail of the spectrum
        want = (sum(x * x for x in s[1:]) ** 0.5) / (sum(x * x for x in s) ** 0.5)
        assert abs(ex2.errors[p] - want) < 1e-4
        true = (tuned.get_submodule(p).weight - base.get_submodule(p).weight).double()
        assert abs(_rel((B @ A).double(), true) - want) < 1e-4


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99, 0.999999])
def test_energy_threshold_picks_the_smallest_sufficient_rank(energy):
    base, tuned, _ = tuned_pair()
    ex = lorakit.extract_lora(base, tuned, energy=energy)
    for p, s in SPECTRA.items():
        e = torch.tensor(s) ** 2
        cum = torch.cumsum(e, 0) / e.sum()
        want = int((cum < energy - 1e-9).sum()) + 1
        assert ex.ranks[p] == want, (p, ex.ranks[p], want)
        assert ex.energy[p] >= energy - 1e-6
    capped = lorakit.extract_lora(base, tuned, energy=energy, max_rank=1)
    assert set(capped.ranks.values()) == {1}


def test_energy_rank_helper():
    assert energy_rank(torch.tensor([3.0, 4.0 ** 0.5, 0.0]), 0.5) == 1
    assert energy_rank(torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.75) == 3
    assert energy_rank(torch.zeros(3), 0.9) == 0


def _ids():
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))


def test_peft_loads_the_file_and_reproduces_the_tuned_logits(tmp_path):
    peft = pytest.importorskip("peft")
    base, tuned, _ = tuned_pair()
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    rc = cli_main(["extract", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"),
                   "--energy", "0.99", "--out", str(tmp_path / "lora")])
    assert rc == 0
    conf = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and conf["rank_pattern"]  # mixed ranks -> patterns
    ids = _ids()
    want = tuned(ids).logits
    m = peft.PeftModel.from_pretrained(load_pretrained(tmp_path / "base"), str(tmp_path / "lora")).eval()
    got = m(ids).logits
    approx = (got - want).abs().max()
    # energy 0.99 drops a little of down_proj/lm_head: close, not exact; full energy is exact
    assert approx < 0.05
    ex = lorakit.extract_lora(base, tuned, energy=1.0)
    ex.save(tmp_path / "full")
    m = peft.PeftModel.from_pretrained(load_pretrained(tmp_path / "base"), str(tmp_path / "full")).eval()
    assert torch.allclose(m(ids).logits, want, atol=1e-4)
    assert (m(ids).logits - want).abs().max() < approx  # the truncated file is measurably worse
    # and lorakit's own loader reads it too
    lb = load_pretrained(tmp_path / "base")
    lorakit.load_adapter(lb, tmp_path / "full")
    assert torch.allclose(lb(ids).logits, want, atol=1e-4)


def test_biases_that_differ_go_into_lora_bias(tmp_path):
    peft = pytest.importorskip("peft")
    base, tuned = tiny_gpt2(seed=0), tiny_gpt2(seed=0)  # GPT-2: Conv1D layers with biases
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        c = tuned.transformer.h[0].attn.c_attn  # weight (d_in, d_out)
        d = torch.randn(c.weight.shape[1], 2, generator=g) @ torch.randn(2, c.weight.shape[0], generator=g)
        c.weight.add_(0.1 * d.t())
        c.bias.add_(torch.randn(c.bias.shape, generator=g) * 0.1)
        tuned.transformer.h[1].mlp.c_fc.bias.add_(0.05)  # bias only: a rank-1 zero pair carries it
    ex = lorakit.extract_lora(base, tuned, rank=2)
    assert set(ex.factors) == {"transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc"}
    assert ex.ranks["transformer.h.1.mlp.c_fc"] == 1 and not ex.factors["transformer.h.1.mlp.c_fc"][1].any()
    ex.save(tmp_path / "lora")
    conf = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert conf["lora_bias"] is True and conf["fan_in_fan_out"] is True
    ids = _ids()
    m = peft.PeftModel.from_pretrained(tiny_gpt2(seed=0), str(tmp_path / "lora")).eval()
    assert torch.allclose(m(ids).logits, tuned(ids).logits, atol=1e-4)


def test_parameters_a_lora_cannot_express_are_reported(caplog):
    base, tuned, _ = tuned_pair()
    with torch.no_grad():
        tuned.model.norm.weight.add_(0.1)
        tuned.model.embed_tokens.weight[3].add_(1.0)
    with caplog.at_level("WARNING", logger="lorakit.extract"):
        ex = lorakit.extract_lora(base, tuned, rank=2)
    assert sorted(ex.skipped) == ["model.embed_tokens.weight", "model.norm.weight"]
    assert "model.norm.weight" in caplog.text


def test_targets_and_bad_input():
    base, tuned, _ = tuned_pair()
    ex = lorakit.extract_lora(base, tuned, rank=2, targets=["q_proj", "v_proj"])
    assert set(ex.factors) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    with pytest.raises(ConfigError, match="exactly one"):
        lorakit.extract_lora(base, tuned, rank=2, energy=0.9)
    with pytest.raises(ConfigError, match="energy"):
        lorakit.extract_lora(base, tuned, energy=1.5)
    with pytest.raises(ConfigError, match="rank"):
        lorakit.extract_lora(base, tuned, rank=0)
    with pytest.raises(ConfigError, match="nothing to extract"):
        lorakit.extract_lora(base, tiny_llama(seed=0), rank=2)
    with pytest.raises(ConfigError, match="shape"):
        lorakit.extract_lora(base, tiny_llama(seed=0, hidden=16), rank=2)


def test_cli_refuses_a_non_model_directory(tmp_path, capsys):
    rc = cli_main(["extract", "--base", str(tmp_path), "--tuned", str(tmp_path), "--rank", "2", "--out",
                   str(tmp_path / "o")])
    assert rc == 2 and "config.json" in capsys.readouterr().err
