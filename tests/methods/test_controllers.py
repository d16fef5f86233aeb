"""Generic: every method with a Controller runs through the trainer's calling sequence and resumes from state."""
import copy

import pytest
import torch

import lorakit
from lorakit.core import REGISTRY, get_method
from conftest import MLP
from _drive import train

get_method("lora")
WITH = [m for m, c in sorted(REGISTRY.items()) if c.controller.__func__ is not lorakit.Adapter.controller.__func__]
# methods whose controller is optional (off in their contract ``example``): the setting that turns it on
ON = {"sara": {"progressive_iter": 3}}


@pytest.mark.parametrize("method", WITH)
def test_controller_runs_in_trainer_order(method):
    torch.manual_seed(0)
    m = MLP()
    lorakit.attach(m, {"method": method, "targets": ["lin0", "lin1"], "seed": 0, **REGISTRY[method].example,
                       **ON.get(method, {})})
    x = torch.randn(5, 12)
    ctrls = train(m, x, 6)
    assert ctrls and all(isinstance(c, lorakit.Controller) for c in ctrls)
    out = m.eval()(x)
    assert torch.isfinite(out).all()
    for c in ctrls:
        state = copy.deepcopy(c.state_dict())
        c.load_state_dict(state)
