"""One low-rank Config base: the LoRA-scaled methods extend ``LowRankConfig`` instead of re-declaring LoRA's fields
and overwriting them after construction; options a method fixes are refused as keys, never silently overwritten."""
from __future__ import annotations

import dataclasses

import pytest

import lorakit
from conftest import MLP
from lorakit.core import LowRankConfig, get_method
from lorakit.errors import ConfigError

EXTENDERS = ["lora", "dora", "pissa", "qlora", "lq_lora", "dylora", "sora", "corda", "lora_ga", "ba_lora", "kasa"]
# each method's defaults (what its recipe and tests rely on), unchanged by the refactor
DEFAULTS = {"lora": (8, 16.0, 0.0), "dora": (8, 16.0, 0.0), "pissa": (8, 8.0, 0.0), "qlora": (64, 16.0, 0.1),
            "lq_lora": (64, 16.0, 0.0), "dylora": (8, 16.0, 0.0), "sora": (8, 16.0, 0.0), "corda": (128, 128.0, 0.0),
            "lora_ga": (8, 16.0, 0.0), "ba_lora": (8, 8.0, 0.0), "kasa": (8, 16.0, 0.0)}


@pytest.mark.parametrize("name", EXTENDERS)
def test_extends_the_base_with_its_own_defaults(name):
    cls = get_method(name).Config
    assert issubclass(cls, LowRankConfig)
    c = cls()
    assert (c.r, c.alpha, c.dropout) == DEFAULTS[name]
    assert not c.lora_bias and c.init == "default"


@pytest.mark.parametrize("name,key", [("dora", "lora_bias"), ("pissa", "init"), ("dylora", "rslora"),
                                      ("sora", "rslora"), ("qlora", "lora_bias")])
def test_fixed_options_are_refused_not_overwritten(name, key):
    with pytest.raises(ConfigError, match=f"unknown key 'adapter.{key}'"):
        lorakit.attach(MLP(), {"method": name, "targets": ["lin0"], key: True})


def test_constructed_config_is_not_patched_by_the_adapter():
    """DyLoRA used to set cfg.rslora/lora_bias/init after construction; now the class fixes them."""
    cls = get_method("dylora")
    cfg = cls.Config(r=4)
    names = {f.name for f in dataclasses.fields(cfg) if f.init}
    assert "rslora" not in names and "lora_bias" not in names
    before = dataclasses.asdict(cfg)
    cls(MLP().lin0, cfg)
    assert dataclasses.asdict(cfg) == before


def test_fixed_fields_stay_out_of_files_and_dicts(tmp_path):
    m = MLP()
    lorakit.attach(m, {"method": "dora", "targets": ["lin0"], "r": 2})
    lorakit.save_adapter(m, tmp_path)
    block = lorakit.read_adapter_config(tmp_path)["lorakit"]["config"]
    assert "lora_bias" not in block
    back = MLP()
    lorakit.load_adapter(back, tmp_path)  # the saved config is valid for DoRA
    cfg = lorakit.AttachConfig.make(get_method("sora").Config(r=3))
    assert "rslora" not in cfg.options and cfg.options["r"] == 3
