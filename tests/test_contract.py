"""The contract every registered method must honour, parametrised over the registry and the tiny models.

A new method file is tested here automatically; its own mechanism test goes in tests/methods/test_<name>.py.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import lorakit
from lorakit.core import REGISTRY, get_method

from conftest import CASES, run

get_method("lora")  # import every method
METHODS = sorted(REGISTRY)


def options(method: str) -> dict:
    cls = REGISTRY[method]
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    opts = {"r": 2} if "r" in fields else {}
    opts.update(cls.example)
    return opts


def cases_for(method: str) -> list[str]:
    return [c for c, (_, _, _, kind) in CASES.items() if kind in REGISTRY[method].layers]


PAIRS = [(m, c) for m in METHODS for c in cases_for(m)]


def calib(case: str, model, x):
    """Calibration batches and a loss for data-driven inits."""
    batches = [x, x.flip(0)]
    return dict(calibration=batches, loss_fn=lambda mdl, b: run(mdl, b).float().pow(2).mean())


def build(method: str, case: str, seed: int = 0, **extra):
    factory, xf, targets, _ = CASES[case]
    torch.manual_seed(seed)
    model = factory()
    x = xf()
    cfg = {"method": method, "targets": targets, "seed": 0, **options(method), **extra}
    kw = calib(case, model, x) if REGISTRY[method].calibration else {}
    return model, x, cfg, kw


def perturb(model, std=0.05, seed=123):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, a in lorakit.adapters(model):
            for n, p in a.named_parameters():
                if p.requires_grad and p.is_floating_point():
                    p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)
            a.clear_cache()


def close(a, b, tol=1e-5):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def ties(model) -> list[set[str]]:
    """Groups of parameter names that are one Parameter object (tied weights), as sorted sets."""
    by: dict[int, set[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by.setdefault(id(p), set()).add(n.replace(".base_layer.", "."))
    return sorted((g for g in by.values() if len(g) > 1), key=sorted)


@pytest.mark.parametrize("method,case", PAIRS)
def test_shapes_init_and_merge(method, case):
    model, x, cfg, kw = build(method, case)
    base_out = run(model, x).detach()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    tied0 = ties(model)
    lorakit.attach(model, cfg, **kw)
    out = run(model, x)
    assert out.shape == base_out.shape and out.dtype == base_out.dtype
    kind = REGISTRY[method].init
    if kind == "noop":
        assert close(out, base_out, 1e-6), f"{method}: ΔW must be 0 at init"
    elif kind == "residual":
        assert close(out, base_out, 1e-4), f"{method}: residual init must preserve the output"
    perturb(model)
    out = run(model, x).detach()
    if REGISTRY[method].mergeable:
        sd_before = {k: v.clone() for k, v in model.state_dict().items()}
        tied_before = ties(model)  # residual inits keep a tied base untied while attached
        with lorakit.merged(model):
            merged_out = run(model, x).detach()
        assert close(merged_out, out), f"{method}: merged forward differs from unmerged"
        for k, v in model.state_dict().items():
            assert torch.equal(v, sd_before[k]), f"unmerge did not restore {k}"
        assert ties(model) == tied_before, "unmerge did not restore the tied weights"
        assert close(run(model, x).detach(), out)
    else:
        with pytest.raises(lorakit.MergeError):
            lorakit.merge_and_unload(model)
    lorakit.detach(model)
    sd = model.state_dict()
    assert set(sd) == set(w0)
    for k, v in sd.items():
        assert torch.equal(v, w0[k]), f"detach did not restore {k} bit-exactly"
    assert ties(model) == tied0, "detach did not restore the tied weights"
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method,case", [(m, c) for m, c in PAIRS if REGISTRY[m].mergeable])
def test_merge_and_unload_same_function(method, case, tmp_path):
    """merge_and_unload hands back a plain model that computes what the unmerged adapter computed (tied weights
    untied, scaled embeddings scaled), and a transformers model saved with save_pretrained reloads to it."""
    model, x, cfg, kw = build(method, case)
    lorakit.attach(model, cfg, **kw)
    perturb(model)
    model.eval()
    out = run(model, x).detach()
    try:
        lorakit.merge_and_unload(model)
    except lorakit.MergeError:
        pytest.skip("this configuration is not mergeable")
    assert not list(lorakit.hosts(model))
    assert close(run(model, x).detach(), out), f"{method}: merge_and_unload changed the function"
    if case not in ("tied", "scaled"):  # the models whose merged weights differ in layout from the base's
        return
    model.save_pretrained(tmp_path / "merged")
    reloaded = type(model).from_pretrained(tmp_path / "merged").eval()
    assert close(run(reloaded, x).detach(), out), f"{method}: the saved merged model reloads as another function"


@pytest.mark.parametrize("method,case", PAIRS)
def test_trainable_params_get_gradients(method, case):
    model, x, cfg, kw = build(method, case)
    lorakit.attach(model, cfg, **kw)
    perturb(model)
    model.train()
    own = {id(p) for _, a in lorakit.adapters(model) for p in a.parameters()}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, "nothing to train"
    assert all(id(p) in own for _, p in trainable), "a non-adapter parameter is trainable"
    loss = run(model, x).float().pow(2).mean()
    extra = lorakit.extra_loss(model)
    if extra is not None:
        assert extra.dim() == 0 and torch.isfinite(extra)
        loss = loss + extra
    loss.backward()
    for n, p in trainable:
        assert p.grad is not None, f"{n} got no gradient"
        assert torch.isfinite(p.grad).all()
    assert any(p.grad.abs().sum() > 0 for _, p in trainable)


@pytest.mark.parametrize("method,case", PAIRS)
def test_save_load_round_trip(method, case, tmp_path):
    model, x, cfg, kw = build(method, case)
    lorakit.attach(model, cfg, **kw)
    perturb(model)
    model.eval()
    out = run(model, x).detach()
    lorakit.save_adapter(model, tmp_path / "a")
    fresh, _, _, _ = build(method, case)
    lorakit.load_adapter(fresh, tmp_path / "a")
    fresh.eval()
    assert close(run(fresh, x).detach(), out), f"{method}: reloaded adapter computes something else"
    conf = lorakit.read_adapter_config(tmp_path / "a")
    assert conf["lorakit"]["method"] == method
    spec = REGISTRY[method].peft
    assert conf["peft_type"] == (spec.peft_type if spec else "LORAKIT")


@pytest.mark.parametrize("method", METHODS)
def test_meta_device_construction(method):
    factory, _, targets, _ = CASES["mlp"]
    if "linear" not in REGISTRY[method].layers:
        pytest.skip("no linear support")
    with torch.device("meta"):
        model = factory()
    lorakit.attach(model, {"method": method, "targets": targets, **options(method)}, defer_init=True)
    for _, a in lorakit.adapters(model):
        assert all(p.device.type == "meta" for p in a.parameters())


@pytest.mark.parametrize("method", [m for m in METHODS if "linear" in REGISTRY[m].layers])
def test_no_graph_breaks_tiny_llama(method):
    model, x, cfg, kw = build(method, "llama")
    lorakit.attach(model, cfg, **kw)
    model.eval()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons


peft = pytest.importorskip("peft") if False else None


@pytest.mark.parametrize("method,case", [(m, c) for m, c in PAIRS if REGISTRY[m].peft is not None])
def test_peft_round_trip(method, case, tmp_path):
    peft = pytest.importorskip("peft")
    model, x, cfg, kw = build(method, case)
    lorakit.attach(model, cfg, **kw)
    perturb(model)
    model.eval()
    out = run(model, x).detach()
    lorakit.save_adapter(model, tmp_path / "lk")
    # lorakit -> PEFT
    base, _, _, _ = build(method, case)
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "lk")).eval()
    assert close(run(pm, x).detach(), out), f"{method}: PEFT computes something else from lorakit's file"
    # PEFT -> lorakit
    pm.save_pretrained(str(tmp_path / "pf"))
    fresh, _, _, _ = build(method, case)
    lorakit.load_adapter(fresh, tmp_path / "pf")
    assert close(run(fresh.eval(), x).detach(), out), f"{method}: lorakit computes something else from PEFT's file"
