"""Training procedures (lorakit.procedures): registry and options, parameter roles, LoRA+'s groups (against an
independent computation and PEFT's create_loraplus_optimizer), LoRA+ with ratio 1 = AdamW bit for bit, and the
method x procedure sweep over the whole registry (each method trains with loraplus or is refused clearly, and the
shape-only preflight at config resolution agrees with the check on the real model)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch

import lorakit
from lorakit.core import REGISTRY
from lorakit.errors import ConfigError
from lorakit.procedures import (PROCEDURES, ROLES, Hyper, Procedure, get_procedure, make_procedure, preflight,
                                register_procedure, setup, trainable_parameters)
from lorakit.procedures.loraplus import LoRAPlus

from conftest import MLP, CASES, run, tiny_llama
from test_contract import METHODS, build, cases_for


def lr_of(opt) -> dict[int, float]:
    """id(param) -> learning rate, asserting every parameter sits in exactly one group."""
    out: dict[int, float] = {}
    for g in opt.param_groups:
        for p in g["params"]:
            assert id(p) not in out, "a parameter in two groups"
            out[id(p)] = g["lr"]
    return out


def wd_of(opt) -> dict[int, float]:
    return {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}


# ---------------------------------------------------------------------------------------------------- registry
def test_registry_names_the_valid_procedures_and_options():
    assert {"adamw", "loraplus"} <= set(PROCEDURES)
    with pytest.raises(ConfigError, match=r"unknown procedure optim.name='lorapls' \(did you mean 'loraplus'\?\); "
                                          r"registered: adamw, .*loraplus"):
        get_procedure("lorapls")
    with pytest.raises(ConfigError, match=r"'optim.ratoi' \(did you mean 'ratio'\?\).*embedding_lr, fast_roles, ratio"):
        make_procedure("loraplus", {"ratoi": 4})
    with pytest.raises(ConfigError, match="procedure 'adamw' has no options of its own"):
        make_procedure("adamw", {"ratio": 4})
    with pytest.raises(ConfigError, match="ratio=0.0 must be > 0"):
        make_procedure("loraplus", {"ratio": 0})
    with pytest.raises(ConfigError, match="'head' cannot take the B rate"):
        make_procedure("loraplus", {"fast_roles": ["B", "head"]})
    with pytest.raises(ConfigError, match="ratio"):
        make_procedure("loraplus", {"ratio": "big"})
    assert make_procedure("loraplus").cfg.ratio == 16.0  # the paper's suggestion


def test_user_registered_procedure_is_resolved_like_a_builtin():
    @register_procedure("test_sgd")
    class SGD(Procedure):
        @dataclass
        class Config:
            momentum: float = 0.0

        def build_optimizer(self, params):
            return torch.optim.SGD([t.param for t in params], lr=self.hp.lr, momentum=self.cfg.momentum)

    try:
        from lorakit.train import resolve

        cfg = resolve(overrides=["optim.name=test_sgd", "optim.momentum=0.5"])
        assert cfg.optim.options == {"momentum": 0.5}
        assert cfg.to_dict()["optim"]["momentum"] == 0.5  # written flat, as given
        model = lorakit.attach(MLP(), {"method": "lora", "targets": ["lin0"], "r": 2})
        _, opt = setup(model, cfg.optim.procedure())
        assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.5
        with pytest.raises(ValueError, match="registered twice"):
            register_procedure("test_sgd")(type("Other", (Procedure,), {}))
        with pytest.raises(TypeError):
            register_procedure("test_bad")(object)
    finally:
        PROCEDURES.pop("test_sgd", None)


def test_config_resolution_validates_the_procedure_before_any_model_loads():
    from lorakit.train import resolve

    cfg = resolve(overrides=["optim.name=loraplus"])
    assert cfg.optim.name == "loraplus" and cfg.optim.options["ratio"] == 16.0
    again = resolve(base=cfg.to_dict())  # a written config.yaml resolves to the same thing
    assert again.optim == cfg.optim
    assert resolve(overrides=["optim.name=loraplus", "optim.ratio=4"]).optim.options["ratio"] == 4.0
    with pytest.raises(ConfigError, match=r"'optim.weigth_decay' \(did you mean 'weight_decay'\?\)"):
        resolve(overrides=["optim.weigth_decay=0.1"])
    with pytest.raises(ConfigError, match="unknown procedure"):
        resolve(overrides=["optim.name=nope"])
    # VeRA trains only scaling vectors: refused at resolution, naming the method, its roles and what fits it
    with pytest.raises(ConfigError, match=r"optim.name=loraplus: .*role A or B; method 'vera' trains roles scale\. "
                                          r"Procedures that fit it: adamw"):
        resolve(overrides=["optim.name=loraplus"], method="vera")


# ---------------------------------------------------------------------------------------------------- roles
@pytest.mark.parametrize("method", METHODS)
def test_declared_roles_are_in_the_vocabulary_and_name_real_tensors(method):
    cls = REGISTRY[method]
    assert all(r in ROLES for r in cls.roles.values()), f"{method}: roles {cls.roles} outside {sorted(ROLES)}"
    case = "mlp" if "mlp" in cases_for(method) else cases_for(method)[0]
    model, x, cfg, kw = build(method, case)
    lorakit.attach(model, cfg, **kw)
    names = set()
    for _, a in lorakit.adapters(model):
        names |= {n for n, _ in a.named_parameters()} | {n for n, _ in a.named_buffers()}
    for key in cls.roles:
        assert any(n == key or n.startswith(key + ".") for n in names), f"{method}: role key {key!r} names no tensor"
    tps = trainable_parameters(model)
    assert [t.name for t in tps] == [n for n, p in model.named_parameters() if p.requires_grad]
    for t in tps:
        assert t.role in ROLES and (t.adapter is None or t.method == method)


def test_roles_of_heads_biases_and_undeclared_parameters():
    model = lorakit.attach(MLP(), {"method": "dora", "targets": ["lin0"], "r": 2, "trainable": ["out"],
                                   "bias": "lora_only"})
    roles = {t.name: t.role for t in trainable_parameters(model)}
    assert roles == {"lin0.base_layer.bias": "bias",
                     "lin0.adapters.default.lora_magnitude_vector": "magnitude",
                     "lin0.adapters.default.lora_A.weight": "A", "lin0.adapters.default.lora_B.weight": "B",
                     "out.copies.default.weight": "head", "out.copies.default.bias": "head"}
    nola = lorakit.attach(MLP(), {"method": "nola", "targets": ["lin0"], "r": 2, **REGISTRY["nola"].example})
    assert {t.role for t in trainable_parameters(nola)} == {"other"}  # NOLA declares no roles


# ---------------------------------------------------------------------------------------------------- LoRA+
@pytest.mark.parametrize("adapter", [
    {"method": "lora", "targets": ["q_proj", "v_proj", "embed_tokens"], "r": 2, "trainable": ["lm_head"]},
    {"method": "dora", "targets": ["q_proj", "o_proj"], "r": 2, "bias": "all", "trainable": ["lm_head"]},
])
def test_loraplus_groups_get_lr_and_ratio_times_lr(adapter):
    lr, lam, head_lr = 3e-4, 8.0, 1e-3
    model = tiny_llama(attention_bias=True)
    lorakit.attach(model, adapter)
    proc = make_procedure("loraplus", {"ratio": lam}, Hyper(lr=lr, weight_decay=0.1, trainable_lr=head_lr))
    _, opt = setup(model, proc)
    got, wd = lr_of(opt), wd_of(opt)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert set(got) == {id(p) for _, p in named}  # every trainable parameter in exactly one group
    fast = 0
    for n, p in named:  # the expected rate, worked out from the names here (independent of roles)
        head = "lm_head" in n
        is_b = not head and ("lora_B" in n or "magnitude" in n or n.endswith(".bias"))
        fast += is_b
        assert got[id(p)] == (head_lr if head else lr * lam if is_b else lr), n
        assert wd[id(p)] == (0.1 if p.ndim >= 2 or head else 0.0), n
    assert fast >= 4
    b = [g for g in opt.param_groups if g["name"] == "fast"][0]
    a = [g for g in opt.param_groups if g["name"] == "base"][0]
    assert b["lr"] / a["lr"] == lam
    if "embed_tokens" in adapter["targets"]:  # embedding_lr: adapters on embeddings at that fixed rate (PEFT's)
        _, opt = setup(model, make_procedure("loraplus", {"embedding_lr": 1e-6}, Hyper(lr=lr)))
        got = lr_of(opt)
        emb = [n for n, p in named if "embed_tokens" in n]
        assert len(emb) == 2 and all(got[id(p)] == 1e-6 for n, p in named if "embed_tokens" in n)


def _peft_key(name: str) -> str:
    return name.replace("base_model.model.", "", 1).replace(".default", "").replace(".adapters", "") \
        .replace("lora_embedding_A", "lora_A").replace("lora_embedding_B", "lora_B").removesuffix(".weight")


@pytest.mark.parametrize("dora", [False, True])
def test_loraplus_matches_peft_create_loraplus_optimizer(dora):
    """PEFT as an oracle: same learning rate for every parameter (LoRA and DoRA on q/v and on the embedding, with
    PEFT's embedding rate set on ours). Weight decay differs by design (we keep adamw's rule, so ratio=1 == adamw)."""
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    lr, lam = 2e-4, 16.0
    targets = ["q_proj", "v_proj"] + ([] if dora else ["embed_tokens"])  # lorakit's DoRA hosts no embeddings
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=targets, r=2, lora_alpha=4, use_dora=dora))
    popt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=lam,
                                     loraplus_lr_embedding=1e-6)
    plr = lr_of(popt)
    want = {_peft_key(n): plr[id(p)] for n, p in pm.named_parameters() if p.requires_grad}
    model = lorakit.attach(tiny_llama(), {"method": "dora" if dora else "lora", "targets": targets, "r": 2,
                                          "alpha": 4})
    _, opt = setup(model, make_procedure("loraplus", {"ratio": lam, "embedding_lr": 1e-6}, Hyper(lr=lr)))
    got = {_peft_key(n): lr_of(opt)[id(p)] for n, p in model.named_parameters() if p.requires_grad}
    assert got == want and len(got) == (12 if dora else 10)


def test_loraplus_ratio_one_is_adamw_bit_for_bit():
    """The reference's invariant: lambda = 1 reproduces the single-rate optimiser exactly (DoRA, a trained bias and a
    head, so every group kind is present)."""
    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(0))
    finals = []
    for name, opts in (("adamw", {}), ("loraplus", {"ratio": 1.0}), ("loraplus", {})):
        torch.manual_seed(0)
        model = lorakit.attach(MLP(), {"method": "dora", "targets": ["lin0", "lin1"], "r": 2, "trainable": ["out"],
                                       "bias": "lora_only", "seed": 0})
        _, opt = setup(model, make_procedure(name, opts, Hyper(lr=1e-2, weight_decay=0.1, trainable_lr=3e-3)))
        for _ in range(4):
            run(model, x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        finals.append([p.detach().clone() for p in model.parameters() if p.requires_grad])
    assert all(torch.equal(a, b) for a, b in zip(finals[0], finals[1]))
    assert not all(torch.equal(a, b) for a, b in zip(finals[0], finals[2]))  # ratio 16 does train differently


def _sweep_case(method):
    return "mlp" if "mlp" in cases_for(method) else cases_for(method)[0]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_with_loraplus_or_is_refused_clearly(method):
    model, x, cfg, kw = build(method, _sweep_case(method))
    lorakit.attach(model, cfg, **kw)
    proc = make_procedure("loraplus", {"ratio": 4.0}, Hyper(lr=1e-3))
    try:
        preflight(proc, cfg)
        early = None
    except ConfigError as e:
        early = e
    try:
        params, opt = setup(model, proc)
    except ConfigError as e:
        assert f"method '{method}'" in str(e) and "Procedures that fit it: adamw" in str(e)
        assert early is not None, f"{method}: refused on the model but not at config resolution"
        return
    assert early is None, f"{method}: refused at config resolution ({early}) but trains on the model"
    got = lr_of(opt)
    roles = {t.role for t in params}
    assert {"A", "B"} <= roles
    for t in params:
        declared = type(t.adapter).role_optim.get(t.role, {}) if t.adapter is not None else {}
        want = declared.get("lr", 4e-3 if t.role in ("B", "magnitude", "bias") and not declared else 1e-3)
        assert got[id(t.param)] == want, (method, t.name)
    run(model, x).float().pow(2).mean().backward()  # and it takes a step
    opt.step()


def test_the_design_docs_example_procedure_works():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "design.md").read_text()
    block = re.search(r"Adding one \(.*?\n\n```python\n(.*?)```", text, re.S).group(1)
    try:
        exec(compile(block, "design.md", "exec"), {})
        model = lorakit.attach(MLP(), {"method": "lora", "targets": ["lin0", "lin1"], "r": 2})
        _, opt = setup(model, make_procedure("freeze_a", {"scale": 4.0}, Hyper(lr=1e-2)))
        before = {n: p.detach().clone() for n, p in model.named_parameters() if "adapters" in n}
        run(model, torch.randn(4, 12)).pow(2).mean().backward()
        opt.step()
        for n, p in model.named_parameters():
            if "adapters" in n:
                assert torch.equal(p, before[n]) == ("lora_A" in n), n
        assert opt.param_groups[0]["lr"] == 4e-2
        with pytest.raises(ConfigError, match="freeze_a needs A factors.*'vera'"):
            setup(lorakit.attach(MLP(), {"method": "vera", "targets": ["lin0"], "r": 2}), make_procedure("freeze_a"))
    finally:
        PROCEDURES.pop("freeze_a", None)


def test_procedures_listing_and_docs_are_current(tmp_path, capsys):
    """`lorakit procedures` lists every registered procedure with its paper; docs/procedures.md is regenerated
    from the registry (stale docs fail here: run `lorakit procedures --markdown docs/procedures.md`)."""
    from pathlib import Path

    from lorakit.cli import main
    from lorakit.procedures import PROCEDURES, list_procedures, procedures_markdown

    rows = list_procedures()
    assert [r["name"] for r in rows] == sorted(PROCEDURES)
    for r in rows:
        assert r["paper"], f"procedure {r['name']} declares no paper"
        assert "arXiv" in r["paper"] or "http" in r["paper"] or "doi" in r["paper"].lower(), r
    assert main(["procedures"]) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in PROCEDURES)
    p = tmp_path / "procedures.md"
    assert main(["procedures", "--markdown", str(p)]) == 0
    assert p.read_text() == procedures_markdown()
    doc = Path(__file__).resolve().parents[1] / "docs" / "procedures.md"
    assert doc.read_text() == procedures_markdown(), "docs/procedures.md is stale"


def test_layer_sampling_is_not_refused_on_a_probe_with_a_trainable_head():
    """A task's trainable head (``trainable: [classifier]``, every MiniLM task) is part of the shape-only probe; it
    must not make LISA/OwLore refuse at config resolution (the arena recorded them as skipped on MiniLM): the probe
    has no layer names, so the decision belongs to the real model."""
    from lorakit.procedures import make_procedure, preflight

    for name in ("lisa", "owlore"):
        preflight(make_procedure(name), {"method": "lora", "r": 2, "trainable": ["classifier"]})
        preflight(make_procedure(name), {"method": "full", "targets": ".*", "trainable": ["classifier"]})
