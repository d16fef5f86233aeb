"""`lorakit merge CONFIG.yaml`: validation before any model loads, adapter and full-model outputs, atomic writes."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml

import lorakit
from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.inject import adapters as adapters_of
from lorakit.merging.cli import read_spec

from conftest import tiny_llama


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("mcli")
    base = tiny_llama(layers=1)
    base.save_pretrained(d / "base")
    for i, n in enumerate(["a", "b"]):
        m = copy.deepcopy(base)
        lorakit.attach(m, {"method": "lora", "r": 2, "alpha": 4, "targets": ["q_proj", "v_proj"], "seed": i}, n)
        g = torch.Generator().manual_seed(30 + i)
        with torch.no_grad():
            for _, a in adapters_of(m, n):
                a.lora_B.weight.copy_(torch.randn(a.lora_B.weight.shape, generator=g) * 0.2)
        lorakit.save_adapter(m, d / n, n)
    return base, d


def _write(d, name, conf):
    p = d / name
    p.write_text(yaml.safe_dump(conf))
    return p


def _conf(d, **kw):
    c = {"base_model": str(d / "base"), "merge_method": "ties",
         "models": [{"model": str(d / "a"), "parameters": {"weight": 1.0}},
                    {"model": str(d / "b"), "parameters": {"weight": 0.5}}],
         "parameters": {"density": 0.5, "rank": 2}, "output": {"path": str(d / "out"), "format": "adapter"}}
    c.update(kw)
    return c


@pytest.mark.parametrize("change,match", [
    ({"merge_method": "slerp"}, "unknown merge method"),
    ({"parameters": {"rank": 2}}, "needs density"),
    ({"parameters": {"density": 1.5}}, "density"),
    ({"slices": []}, "'slices' \\(mergekit\\) is not supported"),
    ({"parameters": {"density": 0.5, "weight_decay": 1}}, "not a lorakit merge parameter"),
    ({"output": {"path": "x", "format": "gguf"}}, "output.format"),
    ({"parameters": {"density": [0.1, 0.5]}}, "gradients"),
])
def test_bad_configs_fail_before_any_model_loads(setup, monkeypatch, change, match):
    _, d = setup
    import lorakit.merging.cli as mc

    monkeypatch.setattr(mc, "_load_base", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError, match=match):
        mc.run_merge(read_spec(_conf(d, **change)))


def test_missing_adapter_and_overlapping_output_are_named(setup, tmp_path):
    _, d = setup
    c = _conf(d)
    c["models"][1]["model"] = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"models\[1\]\.model"):
        read_spec(c)
    with pytest.raises(ConfigError, match="overlaps the input adapter"):
        read_spec(_conf(d, output={"path": str(d / "a" / "sub")}))
    assert main(["merge", str(_write(tmp_path, "bad.yaml", _conf(d, merge_method="nope")))]) == 2


def test_merge_writes_a_peft_adapter_equal_to_combine(setup, tmp_path):
    base, d = setup
    out = tmp_path / "merged"
    c = _conf(d, output={"path": str(out)})
    assert main(["merge", str(_write(tmp_path, "m.yaml", c))]) == 0
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
    m = copy.deepcopy(base)
    lorakit.load_adapter(m, d / "a", "a")
    lorakit.load_adapter(m, d / "b", "b")
    lorakit.combine(m, ["a", "b"], [1.0, 0.5], method="ties", density=0.5, rank=2, name="ref")
    got = copy.deepcopy(base)
    lorakit.load_adapter(got, out, "got")
    ref = {p: a.delta_weight() for p, a in adapters_of(m, "ref")}
    for p, a in adapters_of(got, "got"):
        torch.testing.assert_close(a.delta_weight(), ref[p], atol=1e-6, rtol=1e-5)


def test_merge_writes_a_full_model_with_the_exact_update(setup, tmp_path):
    from lorakit.extract import load_pretrained

    base, d = setup
    out = tmp_path / "model"
    c = _conf(d, merge_method="linear", parameters={"lambda": 0.5}, output={"path": str(out), "format": "model"})
    assert main(["merge", str(_write(tmp_path, "m.yaml", c))]) == 0
    merged = load_pretrained(out)
    m = copy.deepcopy(base)
    lorakit.load_adapter(m, d / "a", "a")
    lorakit.load_adapter(m, d / "b", "b")
    da = {p: a.delta_weight() for p, a in adapters_of(m, "a")}
    db = {p: a.delta_weight() for p, a in adapters_of(m, "b")}
    sd, bsd = merged.state_dict(), base.state_dict()
    for p in da:
        torch.testing.assert_close(sd[p + ".weight"], bsd[p + ".weight"] + 0.5 * (da[p] + 0.5 * db[p]),
                                   atol=1e-5, rtol=1e-5)
    assert torch.equal(sd["model.layers.0.self_attn.k_proj.weight"], bsd["model.layers.0.self_attn.k_proj.weight"])


def test_help_has_examples_and_recipes_list_the_merge_configs(capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "merge_method" in out
    assert main(["recipes"]) == 0
    assert "merge-ties" in capsys.readouterr().out
    from lorakit.train.config import list_recipes

    for r in list_recipes():
        if r["kind"] == "merge":  # every packaged merge config is valid up to its adapter paths
            data = yaml.safe_load(r["path"].read_text())
            assert {"base_model", "merge_method", "models", "output"} <= set(data)


def test_a_factor_only_merge_writes_a_full_model_through_its_factors(setup, tmp_path):
    """lego has no delta-space form: merge_deltas refuses it, and `format: model` merges its factors' product."""
    from lorakit.extract import load_pretrained
    from lorakit.merging.combine import has_delta_form, merge_deltas

    base, d = setup
    assert not has_delta_form("lego") and has_delta_form("ties_svd") and has_delta_form("linear")
    m = copy.deepcopy(base)
    lorakit.load_adapter(m, d / "a", "a")
    lorakit.load_adapter(m, d / "b", "b")
    with pytest.raises(ConfigError, match="lego merges factors"):
        merge_deltas(m, ["a", "b"], [1.0, 0.5], "lego")
    lorakit.combine(m, ["a", "b"], [1.0, 0.5], method="lego", rank=2, name="ref", seed=0)
    ref = {p: a.delta_weight() for p, a in adapters_of(m, "ref")}
    out = tmp_path / "model"
    c = _conf(d, merge_method="lego", parameters={"rank": 2, "seed": 0}, output={"path": str(out), "format": "model"})
    assert main(["merge", str(_write(tmp_path, "m.yaml", c))]) == 0
    sd, bsd = load_pretrained(out).state_dict(), base.state_dict()
    assert ref
    for p, dw in ref.items():
        torch.testing.assert_close(sd[p + ".weight"], bsd[p + ".weight"] + dw, atol=1e-5, rtol=1e-5)
