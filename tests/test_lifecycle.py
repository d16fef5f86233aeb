"""Lifecycle contract, run for every registered method: train/eval mode of new modules, the host's stack of base
snapshots (two base-changing adapters on one layer), requires_grad flags restored, failed calls change nothing,
and one Attachment per attach."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import lorakit
from lorakit.core import REGISTRY
from lorakit.errors import LorakitError, MergeError

from conftest import run
from test_contract import METHODS, build, cases_for, close, perturb

FIRST = [(m, cases_for(m)[0]) for m in METHODS]
RESIDUAL = [m for m in METHODS if REGISTRY[m].init == "residual"]
MERGEABLE = [(m, c) for m, c in FIRST if REGISTRY[m].mergeable]


def noisy(method: str) -> dict:
    """Turn on what makes training mode differ from eval mode (dropout), where the method has it."""
    fields = {f.name for f in dataclasses.fields(REGISTRY[method].Config)}
    return {"dropout": 0.3} if "dropout" in fields else {}


def modes(model) -> dict[str, bool]:
    return {n: m.training for n, m in model.named_modules()}


@pytest.mark.parametrize("method,case", FIRST)
def test_new_modules_take_the_host_mode_and_load_reproduces_eval_outputs(method, case, tmp_path):
    model, x, cfg, kw = build(method, case, **noisy(method))
    model.eval()
    lorakit.attach(model, cfg, **kw)
    train_mode = [n for n, t in modes(model).items() if t]
    assert not train_mode, f"{method}: attached in eval mode but {train_mode[:3]} are in training mode"
    perturb(model)
    with torch.no_grad():
        out = run(model, x)
    lorakit.save_adapter(model, tmp_path / "a")
    fresh, _, _, _ = build(method, case, **noisy(method))
    fresh.eval()
    lorakit.load_adapter(fresh, tmp_path / "a")  # no .eval() after loading: the loaded modules must already be
    with torch.no_grad():
        got = run(fresh, x)
    assert close(got, out), f"{method}: an eval-mode model with the loaded adapter computes something else"
    # and a model in training mode gets adapters in training mode
    m2, _, cfg2, kw2 = build(method, case)
    m2.train()
    lorakit.attach(m2, cfg2, **kw2)
    assert all(a.training for _, a in lorakit.adapters(m2))


def perturb_one(model, name, std=0.05, seed=123):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, a in lorakit.adapters(model, name):
            for p in a.parameters():
                if p.requires_grad and p.is_floating_point():
                    p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)
            a.clear_cache()


@pytest.mark.parametrize("method", RESIDUAL)
@pytest.mark.parametrize("order", ["first-out-first", "last-out-first"])
def test_two_base_changing_adapters_on_one_layer_detach_in_any_order(method, order):
    """Each base-changing init takes its own share out of the base; detaching one puts back exactly that share, so
    the adapter that stays computes what it did (the one detached is left at its init, where its share and its
    output cancel), and once both are gone the base is bit-exact, whichever goes first."""
    case = cases_for(method)[0]
    model, x, cfg, kw = build(method, case)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lorakit.attach(model, cfg, "one", **kw)
    lorakit.attach(model, {"method": "pissa", "targets": cfg["targets"], "r": 2, "seed": 1}, "two")
    first, second = ("one", "two") if order == "first-out-first" else ("two", "one")
    perturb_one(model, second)
    lorakit.set_active(model, ["one", "two"])
    with torch.no_grad():
        before = run(model, x)
    lorakit.detach(model, first)
    assert lorakit.active_names(model) == (second,)
    with torch.no_grad():
        after = run(model, x)
    assert close(after, before, 1e-4), f"{method}: detaching '{first}' changed what '{second}' computes"
    lorakit.detach(model, second)
    now = model.state_dict()
    assert set(now) == set(base)
    bad = [k for k in base if not torch.equal(now[k], base[k])]
    assert not bad, f"{method}: base not restored bit-exactly at {bad[:3]}"


@pytest.mark.parametrize("method,case", FIRST)
def test_requires_grad_flags_come_back_after_detach(method, case):
    model, x, cfg, kw = build(method, case)
    params = list(model.named_parameters())
    for i, (_, p) in enumerate(params):  # a user's own mix of frozen and trainable parameters
        p.requires_grad_(i % 3 == 0)
    flags = {n: p.requires_grad for n, p in params}
    lorakit.attach(model, cfg, **kw)
    lorakit.detach(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@pytest.mark.parametrize("method,case", MERGEABLE)
def test_requires_grad_flags_come_back_after_merge_and_unload(method, case):
    model, x, cfg, kw = build(method, case)
    params = list(model.named_parameters())
    for i, (_, p) in enumerate(params):
        p.requires_grad_(i % 3 == 0)
    flags = {n: p.requires_grad for n, p in params}
    lorakit.attach(model, cfg, **kw)
    lorakit.merge_and_unload(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()],
            sorted(lorakit.attached(model)), lorakit.active_names(model),
            {n: p.requires_grad for n, p in model.named_parameters()})


def _same(model, snap):
    sd, types, names, active, flags = snap
    now = model.state_dict()
    return (set(now) == set(sd) and all(torch.equal(now[k], sd[k]) for k in sd)
            and [type(m) for m in model.modules()] == types and sorted(lorakit.attached(model)) == names
            and lorakit.active_names(model) == active
            and {n: p.requires_grad for n, p in model.named_parameters()} == flags)


@pytest.mark.parametrize("method,case", FIRST)
def test_attach_or_load_while_merged_changes_nothing(method, case, tmp_path):
    model, x, cfg, kw = build(method, case)
    lorakit.attach(model, {"method": "lora", "targets": cfg["targets"], "r": 2} if method != "lora" else cfg,
                   "merged")
    perturb(model)
    saved_model, _, _, _ = build(method, case)
    lorakit.attach(saved_model, cfg, **kw)
    lorakit.save_adapter(saved_model, tmp_path / "a")
    lorakit.merge(model)
    snap = _state(model)
    with pytest.raises(MergeError, match="merged"):
        lorakit.attach(model, cfg, "new", **kw)
    assert _same(model, snap), f"{method}: a refused attach changed the model"
    with pytest.raises(LorakitError, match="merged"):
        lorakit.load_adapter(model, tmp_path / "a", "new")
    assert _same(model, snap), f"{method}: a refused load changed the model"
    lorakit.unmerge(model)


@pytest.mark.parametrize("method,case", FIRST)
def test_failing_init_rolls_back(method, case, monkeypatch):
    model, x, cfg, kw = build(method, case)
    cls = REGISTRY[method]
    if not cls.exclusive:  # a method that cannot share its layers refuses the overlap before any init
        lorakit.attach(model, {"method": "lora", "targets": cfg["targets"], "r": 2}, "keep")
    perturb(model)
    snap = _state(model)

    def boom(self, weight, stats=None):
        raise RuntimeError("init failed")

    monkeypatch.setattr(cls, "init_from", boom)
    with pytest.raises(RuntimeError, match="init failed"):
        lorakit.attach(model, cfg, "new", **kw)
    assert _same(model, snap), f"{method}: a failed init left something behind"


@pytest.mark.parametrize("method,case", FIRST)
def test_one_attachment_per_attach(method, case):
    model, x, cfg, kw = build(method, case)
    lorakit.attach(model, cfg, **kw)
    att = lorakit.attachment(model)
    assert att.method is REGISTRY[method] and att.name == "default"
    assert [m.path for m in att.members] == [p for p, _ in lorakit.adapters(model, "default")]
    for m in att.members:
        assert model.get_submodule(m.path) is m.host and m.host.adapters["default"] is m.adapter
    c1, c2 = lorakit.training_controllers(model), lorakit.training_controllers(model)
    assert len(c1) == len(c2) and all(a is b for a, b in zip(c1, c2)), "controllers must be built once per attach"


@pytest.mark.parametrize("method,case", FIRST)
def test_rank_surgery_goes_by_declared_capability(method, case):
    """lorakit.rank picks adapters by what the class declares (nested ranks / a rank mask), never by an attribute
    that happens to share the name (KaSA's truncate() is an SVD truncation of the base, not a rank cut)."""
    from lorakit.errors import ConfigError

    model, x, cfg, kw = build(method, case)
    lorakit.attach(model, cfg, **kw)
    cls = REGISTRY[method]
    if not cls.nested_ranks:
        with pytest.raises(ConfigError, match="nested ranks"):
            lorakit.rank.truncate(model, 1)
    if not cls.masked_rank:
        with pytest.raises(ConfigError, match="rank mask"):
            lorakit.rank.to_lora(model)
    lr0 = lorakit.adapters(model).__next__()[1].initial_lowrank()
    assert lr0 is None or cls.init == "residual"


def test_the_design_docs_example_method_works():
    """The method example in docs/design.md registers, attaches, and its loss is the mean over modules."""
    import re
    from pathlib import Path

    from conftest import MLP

    text = (Path(__file__).resolve().parents[1] / "docs" / "design.md").read_text()
    block = re.search(r"A minimal\nmethod with a whole-attach piece:\n\n```python\n(.*?)```", text, re.S).group(1)
    try:
        exec(compile(block, "design.md", "exec"), {})
        model = lorakit.attach(MLP(), {"method": "lora_l2", "targets": ["lin0", "lin1"], "r": 2, "l2": 0.5})
        perturb(model)
        Bs = [a.lora_B.weight for _, a in lorakit.adapters(model)]
        want = sum(0.5 * B.pow(2).sum() for B in Bs) / len(Bs)
        assert torch.allclose(lorakit.extra_loss(model), want)
    finally:
        REGISTRY.pop("lora_l2", None)


@pytest.mark.parametrize("method,case", MERGEABLE)
def test_merged_is_as_close_to_the_exact_function_as_the_unmerged_forward(method, case):
    """Merge precision, stated as a bound: the merged fp32 model is no further from the exact (float64) function
    than the unmerged fp32 forward is, up to a small factor. Base-changing inits whose factors are large and cancel
    against the residual base (CorDA with an ill-conditioned covariance: calibrated on fewer rows than d_in) are the
    stress case: both fp32 paths lose about eps·(‖W_res‖ + ‖B‖‖A‖)·‖x‖ there, and merging adds no more than that."""
    import copy

    model, x, cfg, kw = build(method, case)
    lorakit.attach(model, cfg, **kw)
    perturb(model, std=0.2)
    model.eval()
    with torch.no_grad():
        exact = run(copy.deepcopy(model).double(), x if not x.is_floating_point() else x.double())
        unmerged = run(model, x).double()
        with lorakit.merged(model):
            merged = run(model, x).double()
    scale = exact.abs().max()
    err_u = float((unmerged - exact).abs().max() / scale)
    err_m = float((merged - exact).abs().max() / scale)
    assert err_u < 1e-4, f"{method}: the unmerged fp32 forward is {err_u:.1e} from the exact function"
    assert err_m <= 4 * err_u + 1e-6, f"{method}: merging lost precision ({err_m:.1e} vs {err_u:.1e} unmerged)"
