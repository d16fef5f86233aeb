"""The sparse-delta file (indices + values + shape), shared by SaRA, SMT and LT-SFT: what it holds, a clear error
when it is loaded into a base of other shapes or is corrupt, and nothing changed on a refused load."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.errors import AdapterFileError
from lorakit.methods._sparse import INDICES, SHAPE, VALUES
from conftest import MLP

CFGS = {"sara": {"threshold": 0.05}, "lt_sft": {"density": 0.2, "full_steps": 1},
        "smt": {"block": 2, "blocks": 3, "warmup_steps": 1}}


def _saved(method, tmp_path, d_h=16):
    torch.manual_seed(0)
    m = MLP(d_h=d_h)
    lorakit.attach(m, {"method": method, "targets": ["lin0", "lin1"], **CFGS[method]})
    for _, a in lorakit.adapters(m):
        if a.dense_phase():  # a selected support (what the controller leaves), here every other unit
            b = a.unit()
            grid = torch.arange(a.view.d_out * a.view.d_in // b ** 2).view(a.view.d_out // b, a.view.d_in // b)
            a.compact(grid % 2 == 0, rewind=True)
        with torch.no_grad():
            for p in a.parameters():
                p.normal_()
    lorakit.save_adapter(m, tmp_path / method)
    return m, tmp_path / method


@pytest.mark.parametrize("method", sorted(CFGS))
def test_file_holds_indices_values_and_shape_and_round_trips(method, tmp_path):
    m, d = _saved(method, tmp_path)
    t = load_file(str(d / "adapter_model.safetensors"))
    for key, shape in (("lin0", (16, 12)), ("lin1", (16, 16))):
        pre = f"base_model.model.{key}."
        assert {k[len(pre):] for k in t if k.startswith(pre)} == {INDICES, VALUES, SHAPE}
        idx = t[pre + INDICES]
        assert idx.dtype == torch.int64 and bool((idx[1:] > idx[:-1]).all())
        dense = torch.zeros(shape[0] * shape[1])
        dense[idx] = t[pre + VALUES]
        a = dict(lorakit.adapters(m))[key]
        assert torch.equal(dense.view(shape), a.delta_weight())
        if method != "sara":  # only the support is written (half the units)
            b = a.unit()
            assert idx.numel() == (shape[0] * shape[1] // b ** 2 + 1) // 2 * b ** 2
    torch.manual_seed(0)
    fresh = MLP()
    lorakit.load_adapter(fresh, d)
    x = torch.randn(3, 12)
    assert torch.equal(fresh(x), m(x))


@pytest.mark.parametrize("method", sorted(CFGS))
def test_loading_into_a_base_of_other_shapes_names_both_shapes_and_changes_nothing(method, tmp_path):
    _, d = _saved(method, tmp_path)
    other = MLP(d_h=20)
    w0 = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(AdapterFileError, match=r"trained on a 16x12 weight.*layer is 20x12"):
        lorakit.load_adapter(other, d)
    assert not list(lorakit.hosts(other))
    assert all(torch.equal(v, w0[k]) for k, v in other.state_dict().items())


@pytest.mark.parametrize("bad,match", [("range", "must lie in"), ("order", "strictly increasing"),
                                       ("length", "one length")])
def test_a_corrupt_sparse_delta_is_refused(bad, match, tmp_path):
    _, d = _saved("sara", tmp_path)
    f = d / "adapter_model.safetensors"
    t = load_file(str(f))
    k = "base_model.model.lin0." + INDICES
    if bad == "range":
        t[k] = t[k].clone()
        t[k][-1] = 16 * 12
    elif bad == "order":
        t[k] = t[k].flip(0).contiguous()
    else:
        t["base_model.model.lin0." + VALUES] = t["base_model.model.lin0." + VALUES][:-1].contiguous()
    save_file(t, str(f))
    torch.manual_seed(0)
    with pytest.raises(AdapterFileError, match=match):
        lorakit.load_adapter(MLP(), d)
    assert json.loads((d / "adapter_config.json").read_text())["peft_type"] == "LORAKIT"


def test_an_smt_file_that_is_not_whole_blocks_is_refused(tmp_path):
    _, d = _saved("smt", tmp_path)
    f = d / "adapter_model.safetensors"
    t = load_file(str(f))
    for k in ("base_model.model.lin0." + INDICES, "base_model.model.lin0." + VALUES):
        t[k] = t[k][1:].contiguous()  # one entry short of a whole 2x2 block
    save_file(t, str(f))
    torch.manual_seed(0)
    with pytest.raises(AdapterFileError, match="whole 2x2 blocks"):
        lorakit.load_adapter(MLP(), d)
