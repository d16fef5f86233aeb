"""Adapters on tied and scaled embeddings (issue 25).

Semantics under test: an adapter changes the module it is attached to, never the other users of that module's
weight, merged or not (a LoRA on a tied ``embed_tokens`` changes the input side only, as its unmerged forward and
PEFT's do); a scaled embedding's ``embed_scale`` multiplies the adapter's delta exactly as it multiplies the base
output. The contract suite runs every embedding-capable method on the tied and scaled tiny models; this file
checks what it cannot: the weights' identity, the config after merge_and_unload, odd modules, serving.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit
from conftest import run, tiny_gemma, tiny_llama

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def randomize(model, std=0.1, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, a in lorakit.adapters(model):
            for p in a.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * std)
            a.clear_cache()


def close(a, b, tol=1e-5):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def tied(model) -> bool:
    return model.lm_head.weight is model.get_input_embeddings().weight


# ----------------------------------------------------------------------------------------------------------------
# tied weights
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("targets", [["embed_tokens"], ["lm_head"], ["embed_tokens", "lm_head"]])
def test_tied_merge_changes_the_adapted_side_only_and_reties(targets):
    """LoRA on the input side, the output side or both of a tied pair: merged = unmerged; while merged the
    weights are untied and the unadapted side keeps the original tensor; unmerge/detach re-tie the same object."""
    m = tiny_llama(tie_word_embeddings=True)
    shared = m.lm_head.weight
    w0 = shared.detach().clone()
    base = run(m, IDS).detach()
    lorakit.attach(m, {"method": "lora", "targets": targets, "r": 2})
    randomize(m)
    out = run(m, IDS).detach()
    assert not close(out, base), "the adapter must change the output for this test to mean anything"
    lorakit.merge(m)
    assert not tied(m)
    assert close(run(m, IDS).detach(), out)
    untouched = [w for w in (m.lm_head.weight, m.get_input_embeddings().weight) if w is shared]
    if targets != ["embed_tokens", "lm_head"]:  # one side adapted: that side alone holds a private merged copy
        assert len(untouched) == 1 and torch.equal(untouched[0], w0)
    lorakit.unmerge(m)
    assert tied(m) and m.lm_head.weight is shared and torch.equal(shared, w0)
    assert close(run(m, IDS).detach(), out)
    lorakit.detach(m)
    assert tied(m) and m.lm_head.weight is shared and torch.equal(shared, w0)
    assert torch.equal(run(m, IDS), base)


def test_tied_and_scaled_gemma_merge_and_unload_saves_untied(tmp_path):
    """Gemma ties its head to a scaled embedding (the combination of real models): merge_and_unload keeps the
    function, records that the weights are no longer tied, and save_pretrained/from_pretrained round-trips it."""
    from transformers import GemmaForCausalLM

    m = tiny_gemma(tie_word_embeddings=True)
    assert tied(m) and m.config.tie_word_embeddings
    lorakit.attach(m, {"method": "lora", "targets": ["embed_tokens", "q_proj"], "r": 2})
    randomize(m)
    out = run(m, IDS).detach()
    lorakit.merge_and_unload(m)
    assert not tied(m)
    assert m.config.tie_word_embeddings is False
    assert "lm_head.weight" not in m.all_tied_weights_keys
    assert close(run(m, IDS).detach(), out)
    m.save_pretrained(tmp_path / "merged")
    back = GemmaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not tied(back)
    assert close(run(back, IDS).detach(), out)
    assert torch.equal(back.lm_head.weight, m.lm_head.weight)
    assert torch.equal(back.get_input_embeddings().weight, m.get_input_embeddings().weight)


def test_trained_copy_of_a_tied_head_unloads_untied(tmp_path):
    """``trainable: [lm_head]`` trains a copy of a tied head: after merge_and_unload the head is that copy, so the
    model is untied and must say so, or from_pretrained would tie the trained head back to the embedding."""
    from transformers import LlamaForCausalLM

    m = tiny_llama(tie_word_embeddings=True)
    lorakit.attach(m, {"method": "lora", "targets": ["q_proj"], "r": 2, "trainable": ["lm_head"]})
    randomize(m)
    with torch.no_grad():
        m.lm_head.copies["default"].weight.add_(0.1)
    out = run(m, IDS).detach()
    lorakit.merge_and_unload(m)
    assert not tied(m) and m.config.tie_word_embeddings is False
    assert close(run(m, IDS).detach(), out)
    m.save_pretrained(tmp_path / "merged")
    assert close(run(LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval(), IDS).detach(), out)


def test_untied_merge_keeps_config_and_parameters():
    """Only tied bases are copied: merging an untied base writes in place (the Parameter object is unchanged), and
    merge_and_unload of an adapter away from tied weights leaves tie_word_embeddings alone."""
    m = tiny_llama(tie_word_embeddings=True)
    q = m.model.layers[0].self_attn.q_proj
    wq = q.weight
    lorakit.attach(m, {"method": "lora", "targets": ["q_proj"], "r": 2})
    randomize(m)
    lorakit.merge_and_unload(m)
    assert m.model.layers[0].self_attn.q_proj.weight is wq
    assert tied(m) and m.config.tie_word_embeddings


def test_residual_init_on_tied_embedding_loads_and_detaches(tmp_path):
    """LoLDU replaces the base with a residual: on a tied embedding that residual is the embedding's alone (the head
    keeps the original), when attached and when loaded from a file; detach ties the weights again."""
    m = tiny_llama(tie_word_embeddings=True)
    head0 = run(m, IDS).detach()
    shared = m.lm_head.weight
    lorakit.attach(m, {"method": "loldu", "targets": ["embed_tokens"], "r": 2})
    assert m.lm_head.weight is shared and not tied(m)
    assert close(run(m, IDS).detach(), head0, 1e-4)
    randomize(m, std=0.02)
    out = run(m, IDS).detach()
    lorakit.save_adapter(m, tmp_path / "a")
    fresh = tiny_llama(tie_word_embeddings=True)
    fresh_shared = fresh.lm_head.weight
    lorakit.load_adapter(fresh, tmp_path / "a")
    assert close(run(fresh, IDS).detach(), out)
    assert fresh.lm_head.weight is fresh_shared
    lorakit.detach(fresh)
    assert tied(fresh) and fresh.lm_head.weight is fresh_shared
    lorakit.detach(m)
    assert tied(m) and torch.equal(run(m, IDS), head0)


@pytest.mark.parametrize("order", [("a", "b"), ("b", "a")])
def test_two_residual_adapters_and_a_merge_on_a_tied_embedding_come_off_in_any_order(order):
    """The host's snapshot stack on a tied base: the first change unties, the last release reties (same object)."""
    m = tiny_llama(tie_word_embeddings=True)
    shared = m.lm_head.weight
    sd0 = {k: v.clone() for k, v in m.state_dict().items()}
    base = run(m, IDS).detach()
    for n in ("a", "b"):
        lorakit.attach(m, {"method": "loldu", "targets": ["embed_tokens"], "r": 2}, n)
    lorakit.set_active(m, ["a", "b"])
    randomize(m, std=0.02)
    out = run(m, IDS).detach()
    with lorakit.merged(m):
        assert close(run(m, IDS).detach(), out)
        assert m.lm_head.weight is shared and torch.equal(shared, sd0["lm_head.weight"])
    lorakit.detach(m, order[0])
    assert m.lm_head.weight is shared and not tied(m)
    lorakit.detach(m, order[1])
    assert tied(m) and m.lm_head.weight is shared
    assert all(torch.equal(v, sd0[k]) for k, v in m.state_dict().items())
    assert torch.equal(run(m, IDS), base)


def test_gradient_calibration_of_a_tied_embedding_is_its_own_use():
    """Gradient-based inits (LoRA-SB, ...) on a tied embedding see the gradient of the embedding's use of the
    weight, as on an untied model with the same values (not the sum with the head's); the tie is kept."""
    m = tiny_llama(tie_word_embeddings=True)
    untied_m = copy.deepcopy(m)
    untied_m.lm_head.weight = nn.Parameter(untied_m.lm_head.weight.detach().clone())
    assert torch.equal(run(m, IDS), run(untied_m, IDS))
    batches = [IDS, IDS.flip(0)]
    loss = lambda mdl, b: run(mdl, b).float().pow(2).mean()  # noqa: E731
    paths = ["model.embed_tokens"]
    got = lorakit.calibrate(m, paths, batches, "gradients", loss_fn=loss)[paths[0]]["grad"]
    want = lorakit.calibrate(untied_m, paths, batches, "gradients", loss_fn=loss)[paths[0]]["grad"]
    assert want.abs().max() > 0 and torch.allclose(got, want, atol=1e-7, rtol=1e-5)
    assert tied(m) and m.lm_head.weight.grad is None


def test_module_used_at_two_paths_is_refused():
    """One module object at two paths cannot be adapted exactly at one of them: refused before any change."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(30, 8)
            self.emb_again = self.emb
            self.out = nn.Linear(8, 4)

        def forward(self, ids):
            return self.out(self.emb(ids) + self.emb_again(ids.flip(-1)))

    m = Shared()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(lorakit.TargetError, match="emb_again"):
        lorakit.attach(m, {"method": "lora", "targets": ["emb"], "r": 2})
    assert isinstance(m.emb, nn.Embedding) and m.emb is m.emb_again and not lorakit.attached(m)
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())


# ----------------------------------------------------------------------------------------------------------------
# scaled embeddings
# ----------------------------------------------------------------------------------------------------------------
class FloatScaledEmbedding(nn.Embedding):
    """BART-style: the scale is a plain float attribute (Gemma's is a tensor buffer; see conftest.tiny_gemma)."""

    def __init__(self, n, d, scale):
        super().__init__(n, d)
        self.embed_scale = scale

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale


class ScaledNet(nn.Module):
    def __init__(self, scale=3.5):
        super().__init__()
        torch.manual_seed(0)
        self.emb = FloatScaledEmbedding(30, 12, scale)
        self.lin = nn.Linear(12, 6)

    def forward(self, ids):
        return self.lin(self.emb(ids))


def test_lora_delta_goes_through_a_float_embed_scale():
    """The LoRA delta on a scaled embedding is ``embed_scale · s · B A[:, ids]`` (the formula, computed here)."""
    m = ScaledNet()
    ids = IDS % 30
    lorakit.attach(m, {"method": "lora", "targets": ["emb"], "r": 2, "alpha": 3})
    randomize(m)
    a = dict(lorakit.adapters(m))["emb"]
    e = m.emb.base_layer
    expect = (e.weight[ids] + (a.A.t()[ids] @ a.B.t()) * a.scale) * 3.5
    assert close(m.emb(ids), expect)
    with lorakit.merged(m):
        assert close(m.emb(ids), expect)


@pytest.mark.parametrize("method", ["lora", "dylora", "sora", "loldu", "adalink", "nola", "svfit", "lora_xs"])
def test_float_scaled_embedding_merges_exactly(method):
    m = ScaledNet()
    ids = IDS % 30
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    lorakit.attach(m, {"method": method, "targets": ["emb"], "r": 2, "seed": 0})
    randomize(m, std=0.05)
    out = m(ids).detach()
    with lorakit.merged(m):
        assert close(m(ids).detach(), out), f"{method}: merged differs from unmerged on a scaled embedding"
    lorakit.detach(m)
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())


def test_float_embed_scale_lora_matches_peft_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    m = ScaledNet()
    ids = IDS % 30
    lorakit.attach(m, {"method": "lora", "targets": ["emb"], "r": 2, "alpha": 3})
    randomize(m)
    ref = m(ids).detach()
    lorakit.save_adapter(m, tmp_path / "lk")
    pm = peft.PeftModel.from_pretrained(ScaledNet(), str(tmp_path / "lk")).eval()
    assert close(pm(ids).detach(), ref), "PEFT computes something else from lorakit's file"
    pm.save_pretrained(str(tmp_path / "pf"))
    fresh = ScaledNet()
    lorakit.load_adapter(fresh, tmp_path / "pf")
    assert close(fresh(ids).detach(), ref), "lorakit computes something else from PEFT's file"


@pytest.mark.parametrize("bad", [torch.ones(12), "sqrt(d)"])
def test_unusable_embed_scale_is_refused(bad):
    m = ScaledNet()
    m.emb.embed_scale = bad
    with pytest.raises(lorakit.TargetError, match="embed_scale"):
        lorakit.attach(m, {"method": "lora", "targets": ["emb"], "r": 2})
    assert isinstance(m.emb, FloatScaledEmbedding) and not lorakit.attached(m)


# ----------------------------------------------------------------------------------------------------------------
# serving and export
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,what", [(lambda: tiny_llama(tie_word_embeddings=True), "shares its weight with lm_head"),
                                       (lambda: tiny_gemma(), "scales its output by embed_scale")])
def test_bank_and_export_refuse_embedding_adapters(make, what, tmp_path):
    from lorakit.serve.bank import install, read_served
    from lorakit.serve.export import export_adapter

    m = make()
    lorakit.attach(m, {"method": "lora", "targets": ["embed_tokens", "q_proj"], "r": 2})
    randomize(m)
    lorakit.save_adapter(m, tmp_path / "a")
    bank = install(make())
    with pytest.raises(lorakit.AdapterFileError, match=what) as e:
        read_served(bank, tmp_path / "a", "a")
    assert "merge_and_unload" in str(e.value) and "embed_tokens" in str(e.value)
    for fmt in ("vllm", "gguf"):
        with pytest.raises(lorakit.LorakitError, match="embed_tokens"):
            export_adapter(tmp_path / "a", tmp_path / fmt, fmt, model=make())
        assert not (tmp_path / fmt).exists()


def test_bank_serves_a_tied_output_head_as_the_unmerged_adapter(tmp_path):
    """A LoRA on a tied lm_head served from the bank changes the head only, as unmerged and merged lorakit do."""
    from lorakit.serve.bank import install, read_served

    m = tiny_llama(tie_word_embeddings=True)
    lorakit.attach(m, {"method": "lora", "targets": r".*(lm_head|q_proj)", "r": 2})
    randomize(m)
    ref = run(m, IDS).detach()
    lorakit.save_adapter(m, tmp_path / "a")
    served = tiny_llama(tie_word_embeddings=True)
    bank = install(served, targets=r".*(lm_head|q_proj)")
    bank.add(read_served(bank, tmp_path / "a", "a"))
    bank.set_adapters(["a", "a"])
    with torch.no_grad():
        assert close(run(served, IDS), ref)
    assert tied(served)
    merged = copy.deepcopy(m)
    lorakit.merge_and_unload(merged)
    assert close(run(merged, IDS).detach(), ref)
