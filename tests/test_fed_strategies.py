"""Federated LoRA aggregation (methods-training.md D1-D3): each invariant checked against the formula written out
here, independently of lorakit's helpers; the Dirichlet split; config validation before any model loads."""
from __future__ import annotations

import builtins
import math

import numpy as np
import pytest
import torch

from lorakit.errors import ConfigError, LorakitError
from lorakit.federated import dirichlet_split, resolve_federated
from lorakit.federated.strategies import Pair, aggregate, fair_correction, fair_objective

D_OUT, D_IN, R, K = 12, 10, 3, 4


def _clients(shared_A=False, seed=0, extra=False):
    g = torch.Generator().manual_seed(seed)
    A0 = torch.randn(R, D_IN, generator=g)
    states = []
    for _ in range(K):
        A = A0.clone() if shared_A else torch.randn(R, D_IN, generator=g)
        s = {"m.lora_A": A, "m.lora_B": torch.randn(D_OUT, R, generator=g)}
        if extra:
            s["head.w"] = torch.randn(2, 5, generator=g)
        states.append(s)
    w = [10.0, 30.0, 20.0, 40.0]
    return states, w, [Pair(A="m.lora_A", B="m.lora_B")]


def _ideal(states, w):  # Σ p_k B_k A_k, written out in float64
    p = np.array(w) / np.sum(w)
    return sum(pk * (s["m.lora_B"].double().numpy() @ s["m.lora_A"].double().numpy()) for pk, s in zip(p, states))


def test_fedit_averages_factors_separately_and_is_inexact():
    states, w, pairs = _clients(extra=True)
    new, diag = aggregate("fedit", states, w, pairs)
    p = np.array(w) / np.sum(w)
    for k in ("m.lora_A", "m.lora_B", "head.w"):
        np.testing.assert_allclose(new[k].numpy(), sum(pk * s[k].numpy() for pk, s in zip(p, states)), atol=1e-6)
    got = new["m.lora_B"].double().numpy() @ new["m.lora_A"].double().numpy()
    ideal = _ideal(states, w)
    assert np.linalg.norm(got - ideal) > 0.1 * np.linalg.norm(ideal)  # (ΣpB)(ΣpA) != ΣpBA
    assert diag["agg_error"] == pytest.approx(np.linalg.norm(got - ideal) / np.linalg.norm(ideal), rel=1e-5)


def test_ffa_aggregation_is_exact_with_the_shared_frozen_A():
    states, w, pairs = _clients(shared_A=True)
    A = states[0]["m.lora_A"]
    sent = [{"m.lora_B": s["m.lora_B"]} for s in states]  # FFA-LoRA sends B only
    new, _ = aggregate("ffa", sent, w, pairs)
    assert set(new) == {"m.lora_B"}
    np.testing.assert_allclose(new["m.lora_B"].double().numpy() @ A.double().numpy(), _ideal(states, w), atol=1e-5)


def test_fedsb_averaging_R_is_exact():
    g = torch.Generator().manual_seed(3)
    B, A = torch.randn(D_OUT, R, generator=g), torch.randn(R, D_IN, generator=g)
    Rs = [torch.randn(R, R, generator=g) for _ in range(K)]
    w = [1.0, 2.0, 3.0, 4.0]
    new, _ = aggregate("fedsb", [{"m.lora_N": r_} for r_ in Rs], w, [])
    p = np.array(w) / np.sum(w)
    ideal = sum(pk * (B.double().numpy() @ r_.double().numpy() @ A.double().numpy()) for pk, r_ in zip(p, Rs))
    np.testing.assert_allclose(B.double().numpy() @ new["m.lora_N"].double().numpy() @ A.double().numpy(), ideal,
                               atol=1e-5)
    assert new["m.lora_N"].numel() == R * R  # r² per module, whatever K is


def test_exact_strategy_refactorises_the_average_delta():
    states, w, pairs = _clients(shared_A=True)  # rank(ΣpBA) <= r: the re-factorisation is exact
    new, diag = aggregate("exact", states, w, pairs)
    np.testing.assert_allclose(new["m.lora_B"].double().numpy() @ new["m.lora_A"].double().numpy(),
                               _ideal(states, w), atol=1e-5)
    assert diag["agg_error"] < 1e-6
    states, w, pairs = _clients(shared_A=False)  # rank up to K·r: the best rank-r approximation (Eckart-Young)
    new, _ = aggregate("exact", states, w, pairs)
    ideal = _ideal(states, w)
    sv = np.linalg.svd(ideal, compute_uv=False)
    err = np.linalg.norm(new["m.lora_B"].double().numpy() @ new["m.lora_A"].double().numpy() - ideal)
    assert err == pytest.approx(math.sqrt((sv[R:] ** 2).sum()), rel=1e-4)


@pytest.mark.parametrize("solver", ["cosine", "frobenius"])
def test_fair_correction_is_zero_when_clients_agree(solver):
    states, w, pairs = _clients()
    same = [{k: v.clone() for k, v in states[0].items()} for _ in range(K)]
    new, diag = aggregate("fair", same, w, pairs, {"fair_solver": solver, "fair_lambda": 0.01})
    torch.testing.assert_close(new["m.lora_B"], states[0]["m.lora_B"], atol=1e-6, rtol=0)
    torch.testing.assert_close(new["m.lora_A"], states[0]["m.lora_A"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("solver", ["cosine", "frobenius"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fair_never_increases_its_objective(solver, seed):
    states, w, pairs = _clients(seed=seed)
    ideal = torch.from_numpy(_ideal(states, w))
    p = torch.tensor(w, dtype=torch.float64) / sum(w)
    Bb = sum(pk * s["m.lora_B"].double() for pk, s in zip(p, states))
    Ab = sum(pk * s["m.lora_A"].double() for pk, s in zip(p, states))
    lam = 0.01

    def objective(B):  # S(ΔW, B·Ā) + λ‖B − B̄‖², written out
        P = B @ Ab
        if solver == "frobenius":
            s = ((ideal - P) ** 2).sum()
        else:
            s = 1 - (ideal * P).sum() / (ideal.norm() * P.norm())
        return float(s + lam * ((B - Bb) ** 2).sum())

    new, diag = aggregate("fair", states, w, pairs, {"fair_solver": solver, "fair_lambda": lam, "fair_steps": 50})
    torch.testing.assert_close(new["m.lora_A"].double(), Ab, atol=1e-6, rtol=0)  # Ā is kept
    after, before = objective(new["m.lora_B"].double()), objective(Bb)
    assert after <= before + 1e-9
    assert after < before  # and it does correct (the clients disagree)
    assert diag["fair_objective_after"] == pytest.approx(after, rel=1e-4, abs=1e-7)


def test_fair_frobenius_closed_form_is_the_ridge_solution_and_tightens_as_lambda_falls():
    states, w, pairs = _clients(seed=5)
    ideal = torch.from_numpy(_ideal(states, w))
    p = torch.tensor(w, dtype=torch.float64) / sum(w)
    Bb = sum(pk * s["m.lora_B"].double() for pk, s in zip(p, states))
    Ab = sum(pk * s["m.lora_A"].double() for pk, s in zip(p, states))
    lam = 0.1
    # ridge regression of the residual on Ā, solved as least squares on the stacked system [Āᵀ; √λI] ΔBᵀ = [Rᵀ; 0]
    X = torch.cat([Ab.t(), math.sqrt(lam) * torch.eye(R, dtype=torch.float64)])
    Y = torch.cat([(ideal - Bb @ Ab).t(), torch.zeros(R, D_OUT, dtype=torch.float64)])
    want = torch.linalg.lstsq(X, Y).solution.t()
    got = fair_correction(ideal, Bb, Ab, lam=lam, solver="frobenius")
    torch.testing.assert_close(got.double(), want, atol=1e-8, rtol=1e-6)
    errs = [float((ideal - (Bb + fair_correction(ideal, Bb, Ab, lam=l, solver="frobenius")) @ Ab).norm())
            for l in (10.0, 1.0, 0.1, 0.01)]
    assert all(a >= b - 1e-12 for a, b in zip(errs, errs[1:])) and errs[-1] < errs[0]
    assert fair_objective(ideal, Bb, Ab, lam, "frobenius") >= errs[-1] ** 2


def test_dirichlet_split_partitions_and_skews_by_alpha():
    labels = ["a"] * 300 + ["b"] * 300 + ["c"] * 300
    parts = dirichlet_split(labels, 5, 0.1, seed=1)
    assert sorted(i for p in parts for i in p) == list(range(900))
    assert parts == dirichlet_split(labels, 5, 0.1, seed=1)  # a pure function of its inputs
    assert parts != dirichlet_split(labels, 5, 0.1, seed=2)

    def skew(parts):  # mean over clients of the largest label share
        return np.mean([max(sum(labels[i] == c for i in p) for c in "abc") / len(p) for p in parts])

    assert skew(parts) > 0.7  # α = 0.1: mostly one label per client
    assert skew(dirichlet_split(labels, 5, 1000.0, seed=1)) < 0.45  # α → ∞: about IID (1/3 each)
    with pytest.raises(ConfigError, match="alpha"):
        dirichlet_split(labels, 5, 0.0)


BASE = {"model": {"name": "smollm2-135m"}, "adapter": {"method": "lora", "targets": "all-attention", "r": 4},
        "data": {"task": "sentiment-smollm2"}, "federated": {"strategy": "ffa", "clients": 2, "rounds": 1}}


@pytest.mark.parametrize("override,match", [
    ("federated.strategy=fedavg", "strategy"), ("federated.clients=0", "clients"), ("federated.alpha=0", "alpha"),
    ("federated.rounds=0", "rounds"), ("federated.engine=grid", "engine"), ("federated.fair_lambda=-1", "lambda"),
    ("federated.unknown=1", "unknown"), ("federated.dp=true", "dp"),  # default strategy below: fedit
])
def test_bad_federated_options_fail_at_resolution(override, match):
    with pytest.raises(ConfigError, match=match):
        resolve_federated(base=BASE, overrides=["federated.strategy=fedit", override])


@pytest.mark.parametrize("strategy,method,match", [
    ("fedsb", "lora", "core"),  # Fed-SB averages only the r×r core of a frozen-bases method
    ("ffa", "vera", "freezes"),  # no A factor to freeze
    ("fair", "lora_sb", "pairs"),  # LoRA-FAIR corrects trained (A, B) pairs
])
def test_strategy_method_mismatch_fails_before_a_model_loads(monkeypatch, strategy, method, match):
    import lorakit.assets as assets

    monkeypatch.setattr(assets, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError, match=match):
        resolve_federated(base=BASE, overrides=[f"federated.strategy={strategy}", f"adapter.method={method}"])


def test_federate_without_flower_names_the_install(monkeypatch):
    real = builtins.__import__

    def no_flwr(name, *a, **k):
        if name == "flwr" or name.startswith("flwr."):
            raise ImportError("No module named 'flwr'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_flwr)
    from lorakit.federated.engines import run_federated

    fc = resolve_federated(base=BASE)
    with pytest.raises(LorakitError, match=r"pip install 'lorakit\[federated\]'"):
        run_federated(fc)


def test_cli_federate_refuses_bad_config_before_loading(capsys):
    from lorakit.cli import main

    assert main(["federate", "sentiment-minilm", "federated.strategy=fedavg"]) == 2
    assert "federated.strategy='fedavg'" in capsys.readouterr().err
    assert main(["federate", "no-such-recipe"]) == 2
    assert "packaged federated recipes" in capsys.readouterr().err


def _federated_recipes():
    from lorakit.federated.config import FEDERATED_RECIPES

    return sorted(p.stem for p in FEDERATED_RECIPES.glob("*.yaml"))


@pytest.mark.parametrize("name", _federated_recipes())
def test_packaged_federated_recipes_resolve(name):
    fc = resolve_federated(name)
    assert fc.fed.clients >= 2 and fc.fed.rounds >= 1
    assert resolve_federated(f"federated-{name}").to_dict() == fc.to_dict()


def test_recipes_command_lists_and_prints_federated_recipes(capsys):
    from lorakit.cli import main

    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "lorakit federate NAME" in out and "sentiment-minilm-fedsb" in out
    assert main(["recipes", "federated/sentiment-minilm"]) == 0
    assert "strategy: ffa" in capsys.readouterr().out
