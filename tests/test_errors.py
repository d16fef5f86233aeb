"""Bad input: each a lorakit exception that names the problem and leaves the model unchanged."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from conftest import MLP, run, tiny_llama


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def unchanged(model, snap):
    sd, types = snap
    now = model.state_dict()
    return set(now) == set(sd) and all(torch.equal(now[k], sd[k]) for k in sd) and \
        [type(m) for m in model.modules()] == types


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    m = MLP()
    lorakit.attach(m, {"method": "lora", "targets": ["lin0", "lin1"], "r": 2})
    lorakit.save_adapter(m, tmp_path / "a")
    return tmp_path / "a"


def test_no_target_matched():
    m = MLP(); snap = snapshot(m)
    with pytest.raises(lorakit.TargetError, match="matched no module"):
        lorakit.attach(m, {"method": "lora", "targets": ["q_proj"]})
    assert unchanged(m, snap)


def test_unknown_config_key_lists_valid_keys():
    m = MLP(); snap = snapshot(m)
    with pytest.raises(lorakit.ConfigError, match=r"unknown key 'adapter.rank'.*did you mean 'r'.*valid keys"):
        lorakit.attach(m, {"method": "lora", "targets": ["lin0"], "rank": 4})
    with pytest.raises(lorakit.ConfigError, match="unknown method 'lorra'"):
        lorakit.attach(m, {"method": "lorra", "targets": ["lin0"]})
    with pytest.raises(lorakit.ConfigError, match="expected an integer"):
        lorakit.attach(m, {"method": "lora", "targets": ["lin0"], "r": "four"})
    assert unchanged(m, snap)


def test_duplicate_adapter_name():
    m = MLP()
    lorakit.attach(m, {"method": "lora", "targets": ["lin0"]})
    snap = snapshot(m)
    with pytest.raises(lorakit.ConfigError, match="already attached"):
        lorakit.attach(m, {"method": "lora", "targets": ["lin1"]})
    assert unchanged(m, snap)


def test_wrong_shaped_tensor(saved):
    sd = load_file(str(saved / "adapter_model.safetensors"))
    k = next(k for k in sd if k.endswith("lora_A.weight"))
    sd[k] = torch.zeros(3, sd[k].shape[1])
    save_file(sd, str(saved / "adapter_model.safetensors"))
    m = MLP(); snap = snapshot(m)
    with pytest.raises(lorakit.AdapterFileError, match=r"has shape \(3, 12\), expected \(2, 12\)"):
        lorakit.load_adapter(m, saved)
    assert unchanged(m, snap) and not lorakit.attached(m)


def test_missing_tensor(saved):
    sd = load_file(str(saved / "adapter_model.safetensors"))
    sd.pop(next(k for k in sd if k.endswith("lora_B.weight")))
    save_file(sd, str(saved / "adapter_model.safetensors"))
    m = MLP(); snap = snapshot(m)
    with pytest.raises(lorakit.AdapterFileError, match="missing 1 tensors"):
        lorakit.load_adapter(m, saved)
    assert unchanged(m, snap)


def test_unsupported_peft_type(saved):
    conf = json.loads((saved / "adapter_config.json").read_text())
    conf["peft_type"] = "PROMPT_TUNING"; conf.pop("lorakit")
    (saved / "adapter_config.json").write_text(json.dumps(conf))
    m = MLP(); snap = snapshot(m)
    with pytest.raises(lorakit.AdapterFileError, match="'PROMPT_TUNING' is not supported.*supported PEFT types: .*LORA"):
        lorakit.load_adapter(m, saved)
    assert unchanged(m, snap)


def test_not_safetensors(saved):
    (saved / "adapter_model.safetensors").write_bytes(b"\x80\x04this is a pickle, not safetensors")
    m = MLP(); snap = snapshot(m)
    with pytest.raises(lorakit.AdapterFileError, match="not a valid safetensors file"):
        lorakit.load_adapter(m, saved)
    (saved / "adapter_model.safetensors").unlink()
    (saved / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(lorakit.AdapterFileError, match="never unpickles"):
        lorakit.load_adapter(m, saved)
    assert unchanged(m, snap)


def test_malformed_config(saved):
    (saved / "adapter_config.json").write_text("{not json")
    with pytest.raises(lorakit.AdapterFileError, match="not valid JSON"):
        lorakit.load_adapter(MLP(), saved)
    with pytest.raises(lorakit.AdapterFileError, match="not found"):
        lorakit.load_adapter(MLP(), saved / "nope")


def test_adapter_for_another_base_model(saved, tmp_path):
    m = tiny_llama(); snap = snapshot(m)
    with pytest.raises(lorakit.AdapterFileError, match="another base model|cannot attach"):
        lorakit.load_adapter(m, saved)
    assert unchanged(m, snap)
    # same module names, other shapes
    torch.manual_seed(0)
    other = MLP(d_in=20)
    snap = snapshot(other)
    with pytest.raises(lorakit.AdapterFileError, match="has shape"):
        lorakit.load_adapter(other, saved)
    assert unchanged(other, snap)


def test_method_cannot_adapt_layer_type():
    from conftest import EmbNet

    m = EmbNet(); snap = snapshot(m)
    with pytest.raises(lorakit.TargetError, match="cannot adapt 'emb'"):
        lorakit.attach(m, {"method": "pissa", "targets": ["emb"]})
    assert unchanged(m, snap)


def test_calibrated_method_without_data_is_refused():
    from lorakit.core import REGISTRY

    calibrated = [n for n, c in REGISTRY.items() if c.calibration]
    if not calibrated:
        pytest.skip("no calibrated method registered")
    m = MLP(); snap = snapshot(m)
    with pytest.raises(lorakit.ConfigError, match="calibration"):
        # a rank this layer can take (a too large one is refused first, naming the layer)
        lorakit.attach(m, {"method": calibrated[0], "targets": ["lin0"], "r": 2, **REGISTRY[calibrated[0]].example})
    assert unchanged(m, snap)


def test_save_to_unwritable_dir_leaves_nothing(tmp_path):
    m = MLP()
    lorakit.attach(m, {"method": "lora", "targets": ["lin0"]})
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(lorakit.AdapterFileError, match="cannot write"):
        lorakit.save_adapter(m, target / "sub")


def test_packages_are_not_shadowed_and_old_callables_warn():
    """``lorakit.methods`` is the package and ``lorakit.controllers`` the module (no function shadows them); the
    old callables keep working for one release with a DeprecationWarning naming the replacement."""
    import importlib

    import lorakit.controllers
    import lorakit.methods
    from conftest import MLP

    assert lorakit.methods is importlib.import_module("lorakit.methods") and lorakit.methods.lora.LoRA
    assert lorakit.controllers is importlib.import_module("lorakit.controllers")
    assert lorakit.controllers.Controller is lorakit.Controller
    first = lorakit.list_methods()
    assert {"lora", "dora", "pissa"} <= {m["name"] for m in first}
    with pytest.warns(DeprecationWarning, match="list_methods"):
        assert lorakit.methods() == first
    m = MLP()
    lorakit.attach(m, {"method": "adalora", "targets": ["lin0"], "total_step": 10})
    (c,) = lorakit.training_controllers(m)
    with pytest.warns(DeprecationWarning, match="training_controllers"):
        (c2,) = lorakit.controllers(m)
    assert type(c2) is type(c)
