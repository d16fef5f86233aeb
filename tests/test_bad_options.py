"""Issue 16 (library half): bad options over every registered method fail at config resolution with ConfigError,
ranks a layer cannot take fail at attach naming the layer (before any allocation), adapter files with non-finite
weights are refused."""
from __future__ import annotations

import dataclasses
import math
import typing

import pytest
import torch

import lorakit
from lorakit.config import AttachConfig
from lorakit.core import REGISTRY, get_method
from lorakit.errors import ConfigError
from conftest import MLP

import lorakit.methods  # noqa: F401  (fills the registry)

METHODS = sorted(REGISTRY)


def _bad_values(method: str) -> list[tuple[str, object]]:
    """(option, bad value) pairs derived from the method's declared Config: the same kinds the hostile run tried."""
    cls = get_method(method)
    hints = typing.get_type_hints(cls.Config)
    positive = getattr(cls.Config, "positive", ("r",))
    out: list[tuple[str, object]] = []
    for f in dataclasses.fields(cls.Config):
        if not f.init:
            continue
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        lit = [a for a in args if typing.get_origin(a) is typing.Literal]
        if lit:
            out += [(f.name, "no-such-choice"), (f.name, 3)]
        if float in args:
            out += [(f.name, float("nan")), (f.name, float("inf")), (f.name, -float("inf")), (f.name, "abc")]
        if int in args and float not in args:
            if f.name in positive:
                out += [(f.name, 0), (f.name, -1)]
            elif "seed" not in f.name:
                out.append((f.name, -1))
            out += [(f.name, 1.5), (f.name, "3")]
        if "dropout" in f.name:
            out += [(f.name, 1.0), (f.name, -0.1), (f.name, 2)]
        if bool in args and len(args) == 1:
            out.append((f.name, "yes-please"))
    return out


CASES = [(m, k, v) for m in METHODS for k, v in _bad_values(m)]


def test_every_method_has_bad_cases():
    assert all(any(c[0] == m for c in CASES) for m in METHODS)


@pytest.mark.parametrize("method,key,value", CASES, ids=[f"{m}-{k}={v!r}" for m, k, v in CASES])
def test_bad_option_is_a_config_error_at_resolution(method, key, value):
    with pytest.raises(ConfigError, match=key):
        AttachConfig.make({"method": method, key: value})


@pytest.mark.parametrize("method", METHODS)
def test_bad_option_in_overrides_is_refused(method):
    key, value = _bad_values(method)[0]
    with pytest.raises(ConfigError, match="overrides"):
        AttachConfig.make({"method": method, "overrides": {"lin0": {key: value}}})


@pytest.mark.parametrize("spec", [{"targets": "(["}, {"targets": ["q_proj", 3]}, {"targets": [None]},
                                  {"targets": 5}, {"targets": []}, {"exclude": "*bad"}, {"exclude": [1.5]},
                                  {"overrides": {"([": {"r": 2}}}, {"overrides": {"lin0": 3}},
                                  {"layers": [-1]}, {"layers": ["a"]}, {"trainable": [3]}])
def test_bad_target_specs(spec):
    with pytest.raises(ConfigError):
        AttachConfig.make({"method": "lora", **spec})


@pytest.mark.parametrize("override", ["adapter.r=0", "adapter.dropout=1", "adapter.alpha=.nan", "adapter.init=bogus",
                                      "adapter.targets=[1]", "adapter.targets=(["])
def test_train_resolve_refuses_bad_options(override):
    from lorakit.train import resolve

    with pytest.raises(ConfigError):
        resolve(overrides=[override])


def test_no_method_raises_plain_value_error_for_options():
    """No method __init__ validates options with a plain ValueError any more (they are declared on the Config)."""
    import pathlib
    import re

    src = pathlib.Path(lorakit.__file__).parent / "methods"
    offenders = [p.name for p in src.glob("*.py") if re.search(r"raise ValueError\(", p.read_text())]
    assert offenders == []


# ---------------------------------------------------------------- item 9: a rank the layer cannot take
def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


class Emb(torch.nn.Module):  # for embedding-only methods: lin0 sees (d_out, d_in) = (12, 16), max rank 12
    def __init__(self):
        super().__init__()
        self.lin0 = torch.nn.Embedding(16, 12)


def _too_large(method: str, value: int) -> dict:
    cls = get_method(method)
    opts = dict(cls.example)
    for k in cls.rank_options:
        opts[k] = value
    return opts


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("value", [2 ** 40, 13])  # lin0 is 12 -> 16: max rank 12
def test_rank_above_layer_is_refused_naming_the_layer(method, value):
    cls = get_method(method)
    opts = _too_large(method, value)
    if cls.max_rank(lorakit.core.LayerView(torch.nn.Linear(12, 16))) >= value:
        pytest.skip(f"{method}'s rank may exceed min(d_out, d_in) (declared max_rank)")
    try:
        cfg = AttachConfig.make({"method": method, "targets": ["lin0"], **opts})
    except ConfigError:
        return  # the options alone are already inconsistent (e.g. r > target_rank): refused at resolution
    m = MLP() if "linear" in cls.layers else Emb()
    before = snapshot(m)
    with pytest.raises(ConfigError, match="lin0") as e:
        lorakit.attach(m, cfg)
    assert "12" in str(e.value)  # the layer's maximum
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    assert not any(isinstance(x, lorakit.core.Adapted) for x in m.modules())


def test_vera_rank_may_exceed_layer_but_not_its_size():
    m = MLP()
    lorakit.attach(m, {"method": "vera", "targets": ["lin0"], "r": 32})  # > 12: PEFT allows it
    with pytest.raises(ConfigError, match="lin0"):
        lorakit.attach(MLP(), {"method": "vera", "targets": ["lin0"], "r": 2 ** 40})


def test_loldu_default_is_each_layers_full_rank():
    m = MLP()
    lorakit.attach(m, {"method": "loldu", "targets": ["lin0", "out"]})
    ranks = {p: a.loldu_z.numel() for p, a in lorakit.adapters(m)}
    assert ranks == {"lin0": 12, "out": 10}


# ---------------------------------------------------------------- item 10: non-finite weights in a file
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("method", ["lora", "dora", "vera"])
def test_load_adapter_refuses_non_finite_weights(tmp_path, method, bad):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    m = MLP()
    lorakit.attach(m, {"method": method, "targets": ["lin0", "lin1"], "r": 2})
    lorakit.save_adapter(m, tmp_path / "a")
    f = tmp_path / "a" / "adapter_model.safetensors"
    t = load_file(str(f))
    key = sorted(k for k in t if t[k].is_floating_point())[-1]
    t[key] = t[key].clone()
    t[key].view(-1)[0] = bad
    save_file(t, str(f))
    fresh = MLP()
    before = snapshot(fresh)
    with pytest.raises(lorakit.AdapterFileError, match=key.replace(".", r"\.")):
        lorakit.load_adapter(fresh, tmp_path / "a")
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())
    assert not any(isinstance(x, lorakit.core.Adapted) for x in fresh.modules())


# ---------------------------------------------------------------- item 16: recipes ship in the package
def test_recipes_are_package_data_and_listed(capsys):
    import fnmatch
    import pathlib
    import tomllib

    from lorakit.cli import main
    from lorakit.train.config import RECIPES_DIR, list_recipes, method_file, recipe_path, resolve

    pkg = pathlib.Path(lorakit.__file__).parent
    assert RECIPES_DIR.parent == pkg.resolve()
    root = pkg.parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["lorakit"]
    files = [p.relative_to(pkg).as_posix() for p in (pkg / "recipes").rglob("*.yaml")]
    assert files and all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in files)
    names = {r["name"] for r in list_recipes()}
    assert {"sentiment-smollm2-lora", "sentiment-minilm-lora", "vera", "loldu"} <= names
    assert method_file("vera").resolve().parent == RECIPES_DIR / "methods"  # ./configs is a link to it here
    for spec in ("sentiment-minilm-lora", "sentiment-minilm-lora.yaml", "configs/sentiment-minilm-lora.yaml"):
        assert recipe_path(spec).resolve() == RECIPES_DIR / "sentiment-minilm-lora.yaml"
    assert resolve(None, [], method="vera").optim.lr == 4e-3  # the method file's paper rate
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "sentiment-smollm2-lora" in out and "vera" in out
    assert main(["recipes", "methods/vera"]) == 0 and "method: vera" in capsys.readouterr().out
    assert main(["recipes", "nope"]) == 2


def test_packaged_default_recipe_matches_the_embedded_default():
    from lorakit.train.config import DEFAULT, resolve

    assert resolve("sentiment-smollm2-lora").to_dict() == resolve(base=DEFAULT).to_dict()


@pytest.mark.parametrize("method,key,value", [("sltrain", "sp_ratio", 1.0), ("sltrain", "sp_ratio", -0.01),
                                              ("s2lora", "l1", -1e-3)])
def test_range_checks_run_at_resolution_not_at_attach(method, key, value):
    """Out-of-range values that are the right type fail in ``AttachConfig.make`` (config resolution), before any
    model exists, and name the option."""
    with pytest.raises(ConfigError, match=key):
        AttachConfig.make({"method": method, key: value})
