"""Trainable tokens (PEFT's ``trainable_token_indices``): only chosen embedding rows train, a tied head follows
(as in PEFT), any method combines with it, files go both ways with PEFT with identical logits."""
from __future__ import annotations

import json

import pytest
import torch

import lorakit
from conftest import run, tiny_gemma, tiny_llama
from lorakit.errors import ConfigError, LorakitError

peft = pytest.importorskip("peft")

IDS = [3, 5, 60]


def _train_rows(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("tied", [False, True])
def test_peft_file_loads_with_same_logits_and_back(tied, tmp_path):
    x = torch.tensor([[3, 1, 5, 60, 7, 3], [0, 60, 2, 5, 9, 11]])
    pm = peft.get_peft_model(tiny_gemma(tie_word_embeddings=tied),
                             peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=2, trainable_token_indices=IDS))
    _train_rows(pm)
    pm.eval()
    ref = run(pm, x).detach()
    pm.save_pretrained(str(tmp_path / "peft"))
    m = tiny_gemma(tie_word_embeddings=tied)
    y0 = run(m, x).detach()
    lorakit.load_adapter(m, tmp_path / "peft")
    out = run(m.eval(), x).detach()
    assert (out - ref).abs().max().item() <= 1e-5 and (out - y0).abs().max().item() > 1e-3
    if tied:  # the tied head reads the same trained rows
        lm = m.get_output_embeddings()
        assert len(lorakit.attachment(m).token_members) == 2 and lm.adapters["default"].values is \
            m.get_input_embeddings().adapters["default"].values
    lorakit.save_adapter(m, tmp_path / "lk")
    conf = lorakit.read_adapter_config(tmp_path / "lk")
    assert conf["trainable_token_indices"] == IDS
    pm2 = peft.PeftModel.from_pretrained(tiny_gemma(tie_word_embeddings=tied), str(tmp_path / "lk")).eval()
    assert (run(pm2, x) - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("method", ["lora", "vera", "loramoe"])
def test_only_chosen_rows_train_with_any_method(method):
    m = tiny_llama(tie_word_embeddings=True)
    x = torch.tensor([[3, 1, 5, 60, 7, 3]])
    y0 = run(m, x).detach()
    table0 = m.get_input_embeddings().weight.detach().clone()
    opts = {"method": method, "targets": ["q_proj", "v_proj"],
            "trainable_token_indices": IDS}
    lorakit.attach(m, opts)
    # the rows start at their values: nothing changes (the tied head's rows go through their own GEMM: ulps)
    assert torch.allclose(run(m, x).detach(), y0, atol=1e-6, rtol=0)
    tok = [p for n, p in m.named_parameters() if p.requires_grad and "trainable_tokens_delta" in n]
    assert len(tok) == 1 and tok[0].shape == (3, 32)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1.0)
    run(m, x).float().pow(2).mean().backward()
    opt.step()
    # the embedding table itself never changes; rows not listed keep their values in the forward
    assert torch.equal(m.get_input_embeddings().weight, table0)
    emb = m.get_input_embeddings()
    e = emb(torch.arange(64)[None])[0].detach()
    others = [i for i in range(64) if i not in IDS]
    assert torch.equal(e[others], table0[others])
    assert not torch.equal(e[IDS], table0[IDS])
    # tied head: the same rows are replaced in the output projection
    h = torch.randn(2, 32)
    assert torch.allclose(m.get_output_embeddings()(h)[:, IDS], h @ tok[0].detach().t(), atol=1e-6)
    # (allclose: a GEMM over a subset of the rows may round differently from the full one on some CPUs)
    assert torch.allclose(m.get_output_embeddings()(h)[:, others], h @ table0[others].t(), atol=1e-6)


def test_merge_is_exact_and_detach_restores_ties(tmp_path):
    m = tiny_gemma(tie_word_embeddings=True)  # a scaled, tied embedding
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.tensor([[3, 1, 5, 60, 7, 3]])
    lorakit.attach(m, {"method": "lora", "targets": ["q_proj"], "trainable_token_indices": {"embed_tokens": IDS}})
    _train_rows(m)
    out = run(m, x).detach()
    with lorakit.merged(m):
        assert (run(m, x).detach() - out).abs().max().item() <= 1e-5
        assert torch.equal(m.get_input_embeddings().base_layer.weight[IDS],
                           m.get_input_embeddings().adapters["default"].values.detach())
    assert torch.equal(run(m, x).detach(), out)
    lorakit.detach(m)
    assert m.get_input_embeddings().weight is m.get_output_embeddings().weight
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k
    lorakit.attach(m, {"method": "lora", "targets": ["q_proj"], "trainable_token_indices": IDS})
    _train_rows(m)
    out = run(m, x).detach()
    lorakit.merge_and_unload(m)
    assert (run(m, x).detach() - out).abs().max().item() <= 1e-5


def test_bad_token_specs_are_refused_before_any_change():
    m = tiny_llama()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        lorakit.attach(m, {"method": "lora", "targets": ["q_proj"], "trainable_token_indices": [3, 64]})
    with pytest.raises(ConfigError, match="twice"):
        lorakit.attach(m, {"method": "lora", "targets": ["q_proj"], "trainable_token_indices": [3, 3]})
    with pytest.raises(LorakitError, match="matches no module"):
        lorakit.attach(m, {"method": "lora", "targets": ["q_proj"], "trainable_token_indices": {"wte": [3]}})
    with pytest.raises(ConfigError, match="both a target"):
        lorakit.attach(m, {"method": "lora", "targets": ["embed_tokens"], "trainable_token_indices": [3]})
    assert not lorakit.attached(m)
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    assert type(m.get_input_embeddings()) is torch.nn.Embedding


def test_export_refuses_trainable_tokens(tmp_path):
    from lorakit.serve.export import export_adapter

    m = tiny_llama()
    lorakit.attach(m, {"method": "lora", "targets": ["q_proj"], "trainable_token_indices": IDS})
    lorakit.save_adapter(m, tmp_path / "a")
    with pytest.raises(ConfigError, match="trainable_token_indices"):
        export_adapter(tmp_path / "a", tmp_path / "out", "vllm", model=tiny_llama())
