"""Declared per-role optimiser defaults (``Adapter.role_optim``), honoured by the default param groups and LoRA+,
overridable by ``optim.role_optim``; MHR's routing logits train as its authors' code does (own group, lr 0.1, no
weight decay, against the adapters' rate)."""
from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.core import REGISTRY
from lorakit.errors import ConfigError
from lorakit.procedures import Hyper, check_role_optim, make_procedure, setup, trainable_parameters
from lorakit.procedures.base import ROLES

from conftest import MLP


def mhr_model():
    torch.manual_seed(0)
    m = MLP()
    lorakit.attach(m, {"method": "mhr", "targets": ["lin0", "lin1"], "r": 2, "n_tasks": 2, "n_skills": 3,
                       "n_splits": 2, "seed": 0})
    return m


def settings(opt):
    """id(param) -> (lr, weight_decay), each parameter in exactly one group."""
    out = {}
    for g in opt.param_groups:
        for p in g["params"]:
            assert id(p) not in out
            out[id(p)] = (g["lr"], g["weight_decay"])
    return out


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_declared_role_optim_is_valid_and_names_declared_roles(method):
    cls = REGISTRY[method]
    spec = check_role_optim(cls.role_optim, f"{method}.role_optim")
    assert set(spec) <= set(cls.roles.values()) <= set(ROLES)


@pytest.mark.parametrize("name", ["adamw", "loraplus"])
def test_mhr_routing_logits_take_the_authors_group(name):
    m = mhr_model()
    _, opt = setup(m, make_procedure(name, {}, Hyper(lr=1e-3, weight_decay=0.01)))
    got = settings(opt)
    for t in trainable_parameters(m):
        lr, wd = got[id(t.param)]
        if t.role == "router":  # the mttl optimiser: routing logits lr 0.1, no weight decay
            assert (lr, wd) == (0.1, 0.0)
        elif t.role == "A" or name == "adamw":
            assert (lr, wd) == (1e-3, 0.01)
        else:  # LoRA+'s B rate is untouched
            assert (lr, wd) == (pytest.approx(16e-3), 0.01)
    assert any(g["name"] == "role:router" for g in opt.param_groups)


def test_user_role_optim_overrides_the_declaration_and_adds_roles():
    m = mhr_model()
    hp = Hyper(lr=1e-3, weight_decay=0.01, role_optim={"router": {"lr": 0.05}, "B": {"weight_decay": 0.0}})
    _, opt = setup(m, make_procedure("adamw", {}, hp))
    got = settings(opt)
    for t in trainable_parameters(m):
        want = {"router": (0.05, 0.0), "B": (1e-3, 0.0), "A": (1e-3, 0.01)}[t.role]
        assert got[id(t.param)] == want


def test_methods_without_declaration_keep_the_classic_groups_bit_for_bit():
    torch.manual_seed(0)
    m = MLP()
    lorakit.attach(m, {"method": "lora", "targets": ["lin0"], "r": 2})
    _, opt = setup(m, make_procedure("adamw", {}, Hyper(lr=1e-3, weight_decay=0.01)))
    assert [g["name"] for g in opt.param_groups] == ["decay"]


def test_mhr_router_moves_at_its_own_rate_in_one_step():
    """AdamW's first step moves each entry by ≈ lr (sign of the gradient): the routing logits by 0.1, not 1e-3."""
    m = mhr_model()
    m.train()
    _, opt = setup(m, make_procedure("adamw", {}, Hyper(lr=1e-3)))
    logits = [a.poly_router.module_logits for _, a in lorakit.adapters(m)]
    with torch.no_grad():  # a non-zero B so the router has a gradient
        for _, a in lorakit.adapters(m):
            a.poly_lora_B.normal_(std=0.1)
    before = [p.detach().clone() for p in logits]
    with lorakit.batch_context(m, task_ids=torch.tensor([0, 1, 0, 1])):
        m(torch.randn(4, 12)).pow(2).sum().backward()
    opt.step()
    for p, b in zip(logits, before):
        moved = (p.detach() - b).abs()
        moved = moved[p.grad.abs() > 1e-12]
        torch.testing.assert_close(moved, torch.full_like(moved, 0.1), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("spec, match", [
    ({"routr": {"lr": 0.1}}, r"unknown role 'routr' \(did you mean 'router'\?\)"),
    ({"router": {"rate": 0.1}}, "unknown key 'rate'; valid keys: lr, weight_decay"),
    ({"router": {"lr": -1}}, r"router.lr=-1 must be a number >= 0"),
    ({"head": {"lr": 1}}, "unknown role 'head'"),
    ({"router": 0.1}, "must be a mapping"),
])
def test_bad_role_optim_is_refused_naming_the_valid_choices(spec, match):
    with pytest.raises(ConfigError, match=match):
        make_procedure("adamw", {}, Hyper(role_optim=spec))


def test_run_config_accepts_optim_role_optim():
    from lorakit.train.config import resolve
    cfg = resolve(method="mhr", overrides=["optim.role_optim.router.lr=0.2"])
    assert cfg.optim.hyper().role_optim == {"router": {"lr": 0.2}}
    with pytest.raises(ConfigError, match="unknown role 'x'"):
        resolve(method="mhr", overrides=["optim.role_optim.x.lr=1"])
