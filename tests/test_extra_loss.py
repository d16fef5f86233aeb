"""``lorakit.extra_loss``: each active attach contributes ``method.attach_loss(its active adapters)``, which reduces
the per-module ``extra_loss()`` values by the method's ``loss_reduction`` ("sum" | "mean" over the modules that
returned a loss); inactive attaches contribute nothing. The expected values are written out from the per-module
formula (here ``reg · ‖B‖²`` + 1) in the test."""
from dataclasses import dataclass

import pytest
import torch

import lorakit
from lorakit.core import REGISTRY, register
from lorakit.methods.lora import LoRA
from conftest import MLP


@pytest.fixture
def probes():
    @dataclass
    class Cfg(LoRA.Config):
        reg: float = 0.5

    class SumProbe(LoRA):
        Config = Cfg

        def extra_loss(self):
            if self.view.d_out == 10:  # the "out" layer returns no loss (as a router that did not run)
                return None
            return self.cfg.reg * self.lora_B.weight.pow(2).sum() + 1.0

    class MeanProbe(SumProbe):
        loss_reduction = "mean"

    register("probe_sum", family="test", paper="none")(SumProbe)
    register("probe_mean", family="test", paper="none")(MeanProbe)
    SumProbe.peft = MeanProbe.peft = None
    try:
        yield
    finally:
        REGISTRY.pop("probe_sum", None)
        REGISTRY.pop("probe_mean", None)


def _per_module(m, name, reg):
    out = []
    for path, a in lorakit.adapters(m, name):
        if path != "out":
            out.append(reg * a.lora_B.weight.pow(2).sum() + 1.0)
    return out


def test_sum_and_mean_per_attach_and_inactive_attaches_left_out(probes):
    torch.manual_seed(0)
    m = MLP()
    targets = ["lin0", "lin1", "out"]
    lorakit.attach(m, {"method": "probe_sum", "targets": targets, "r": 2, "reg": 0.3}, name="s")
    lorakit.attach(m, {"method": "probe_mean", "targets": targets, "r": 2, "reg": 0.7}, name="m")
    with torch.no_grad():
        for _, a in lorakit.adapters(m):
            a.lora_B.weight.normal_()
    s_terms, m_terms = _per_module(m, "s", 0.3), _per_module(m, "m", 0.7)
    assert len(s_terms) == len(m_terms) == 2
    s_ref = s_terms[0] + s_terms[1]
    m_ref = (m_terms[0] + m_terms[1]) / 2  # mean over the 2 modules that returned a loss, not over 3 adapters
    lorakit.set_active(m, ["s", "m"])
    torch.testing.assert_close(lorakit.extra_loss(m), s_ref + m_ref)
    lorakit.set_active(m, "m")
    torch.testing.assert_close(lorakit.extra_loss(m), m_ref)
    lorakit.set_active(m, "s")
    torch.testing.assert_close(lorakit.extra_loss(m), s_ref)


def test_no_loss_gives_none():
    torch.manual_seed(0)
    m = MLP()
    lorakit.attach(m, {"method": "lora", "targets": ["lin0"], "r": 2})
    assert lorakit.extra_loss(m) is None
