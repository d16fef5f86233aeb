"""Every registered method x the LoRA-aware procedures (allora, lorapro, ggpo, flexora): each method either trains
one step through the procedure's hooks or is refused with a ConfigError naming the method and its roles, and the
shape-only preflight at config resolution agrees with the check on the real model."""
from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.errors import ConfigError
from lorakit.procedures import Hyper, make_procedure, preflight, setup

from conftest import run
from test_contract import METHODS, build, cases_for

PROCS = {"allora": {"require_plain": False}, "lorapro": {"log_every": 1}, "ggpo": {"rho": 0.1}, "mgpo": {},
         "flexora": {"search_fraction": 0.5, "second_order": False}}  # (second order: the mechanism tests)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_or_is_refused_clearly(method):
    case = "mlp" if "mlp" in cases_for(method) else cases_for(method)[0]
    for name, opts in PROCS.items():
        model, x, cfg, kw = build(method, case)
        lorakit.attach(model, cfg, **kw)
        proc = make_procedure(name, opts, Hyper(lr=1e-3))
        try:
            preflight(proc, cfg)
            early = None
        except ConfigError as e:
            early = e
        try:
            _, opt = setup(model, proc)
        except ConfigError as e:
            assert f"method '{method}'" in str(e) and "trains roles" in str(e), (name, str(e))
            assert early is not None, f"{name} x {method}: refused on the model but not at config resolution"
            continue
        assert early is None, f"{name} x {method}: refused at config resolution ({early}) but trains on the model"
        proc.set_validation(lambda i, split="validation": run(model, x).float().pow(2).mean())
        try:
            proc.on_train_begin(model, opt, 2)
        except ConfigError as e:  # flexora on a single layer: told before the first step
            assert name == "flexora" and "layer" in str(e)
            continue
        before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        proc.before_forward(0, model, opt)
        run(model, x).float().pow(2).mean().backward()
        proc.before_step(0, model, opt)
        opt.step()
        proc.after_step(0, model, opt)
        after = [p.detach() for p in model.parameters() if p.requires_grad]
        assert all(torch.isfinite(p).all() for p in after), (name, method)
        assert len(after) <= len(before)
