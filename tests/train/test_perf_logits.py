"""Logits only where needed (issue 23, item 1): the generative classifier, SFT, DPO and the multi-task loss compute
the output head at the positions their loss reads, with the losses, gradients and metrics of the full path. The
reference here is written independently: the model's full (batch, seq, vocab) logits, shifted, log-softmaxed."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit.tasks import get_task, logits as fastlogits
from lorakit.train.config import DataSection

from .conftest import tiny_llama_model
from .test_dpo import _pairs


def _tok(d):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(d)


def _ref_token_logps(model, batch):
    """(per-token log p at labelled positions (mask applied), mask) from the FULL logits."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    z = model(**inputs).logits.double()[:, :-1]
    tgt = batch["labels"][:, 1:]
    lp = z.log_softmax(-1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
    m = tgt != -100
    return lp * m, m


def _lora(model, method="lora", **opts):
    lorakit.attach(model, {"method": method, "targets": "all-linear", "r": 4, "alpha": 8, "seed": 0, **opts})
    torch.manual_seed(1)
    for _, a in lorakit.inject.adapters(model):  # non-zero B so the adapter changes the outputs
        for n, p in a.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.2)
    return model


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _cls_task(cls_data, **kw):
    return get_task("classify-lm", DataSection(task="classify-lm", path=str(cls_data), max_length=32, **kw))


@pytest.mark.parametrize("words", [None, [" positive good", " negative bad"]])
def test_classifier_loss_gradients_and_metrics_equal_the_full_logits_path(tiny_lm_dir, cls_data, words):
    tok = _tok(tiny_lm_dir)
    task = _cls_task(cls_data, label_words=words)
    ex = task.encode(task.rows()["train"][:12], tok)
    model = _lora(tiny_llama_model(tiny_lm_dir)).train()
    assert fastlogits.fast_head(model) is model.lm_head
    batch = task.collate(ex[:8])

    loss, out = task.forward(model, batch)
    assert out.logits.shape[1] == 0  # no full logits were computed
    loss.backward()
    g_fast = _grads(model)
    model.zero_grad()
    lp, m = _ref_token_logps(model, batch)  # transformers' causal-LM loss: mean NLL over labelled tokens
    ref = -lp.sum() / m.sum()
    ref.float().backward()
    g_ref = _grads(model)
    assert float(loss.detach()) == pytest.approx(float(ref), rel=1e-5, abs=1e-6)
    assert g_fast.keys() == g_ref.keys() and g_fast
    for n in g_ref:
        torch.testing.assert_close(g_fast[n], g_ref[n], rtol=1e-4, atol=1e-6)

    # evaluation: argmax over the label words' summed log-probabilities, loss = mean NLL of the true word
    model.eval()
    got = task.evaluate(model, tok, ex, batch_size=5)
    ys, preds, nll = [], [], 0.0
    with torch.no_grad():
        for e in ex:
            s = []
            for w in task.word_ids:
                b = {"input_ids": torch.tensor([e["prompt"] + w]), "labels": torch.tensor([[-100] * len(e["prompt"]) + w])}
                s.append(float(_ref_token_logps(model, b)[0].sum()))
            ys.append(e["y"])
            preds.append(max(range(len(s)), key=s.__getitem__))
            nll -= s[e["y"]]
    assert got["accuracy"] == sum(a == b for a, b in zip(ys, preds)) / len(ys)
    assert got["loss"] == pytest.approx(nll / len(ys), rel=1e-5)


def test_methods_reading_full_outputs_keep_the_full_logits(tiny_lm_dir, cls_data):
    """BA-LoRA's output_loss reads every position (declared full_logits): the task hands it the full logits and
    the trainer's total loss is what the full path gives; X-LoRA declares it for its hook on the head's input."""
    tok = _tok(tiny_lm_dir)
    task = _cls_task(cls_data)
    ex = task.encode(task.rows()["train"][:8], tok)
    batch = task.collate(ex)
    model = tiny_llama_model(tiny_lm_dir).train()
    lorakit.attach(model, {"method": "ba_lora", "targets": "all-linear", "r": 4, "alpha": 8, "seed": 0})
    assert fastlogits.fast_head(model) is None
    loss, out = task.forward(model, batch)
    assert out.logits.shape == (*batch["input_ids"].shape, model.config.vocab_size)
    assert lorakit.output_loss(model, out, batch) is not None
    from lorakit.methods.x_lora import XLoRA
    from lorakit.methods.ba_lora import BALoRA
    from lorakit.methods.lora import LoRA

    assert XLoRA.full_logits and BALoRA.full_logits and not LoRA.full_logits


class _Plugin(lorakit.core.Adapter):  # an undeclared output_loss defaults to needing full logits
    @classmethod
    def output_loss(cls, att, outputs, batch):
        return None


def test_an_output_loss_without_declaration_means_full_logits(tiny_lm_dir):
    from lorakit import inject

    model = tiny_llama_model(tiny_lm_dir)
    _lora(model)
    assert not inject.needs_full_logits(model)
    att = lorakit.attachment(model, "default")
    real = att.method
    try:
        att.method = _Plugin
        assert inject.needs_full_logits(model)
    finally:
        att.method = real
    assert not inject.needs_full_logits(model)


def test_an_adapter_with_extra_loss_trains_the_same_on_the_fast_path(tiny_lm_dir, cls_data):
    """SoRA's sparsity term (extra_loss) is added by the trainer; the task loss under it equals the full path."""
    tok = _tok(tiny_lm_dir)
    task = _cls_task(cls_data)
    batch = task.collate(task.encode(task.rows()["train"][:8], tok))
    model = tiny_llama_model(tiny_lm_dir).train()
    lorakit.attach(model, {"method": "sora", "targets": "all-linear", "r": 4, "seed": 0})
    assert fastlogits.fast_head(model) is not None
    loss, _ = task.forward(model, batch)
    lp, m = _ref_token_logps(model, batch)
    assert float(loss) == pytest.approx(float(-lp.sum() / m.sum()), rel=1e-5)
    assert lorakit.extra_loss(model) is not None


def test_sft_loss_is_chunked_and_equals_the_full_path(tiny_lm_dir, tmp_path, monkeypatch):
    rows = [{"prompt": f"Q {w} :", "completion": " ".join(["good", "the", "movie", w, "so"][:k])}
            for k, w in zip([1, 5, 3, 4, 2, 5], ["fine", "bad", "dull", "nice", "poor", "so"])]
    p = tmp_path / "sft.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
    tok = _tok(tiny_lm_dir)
    task = get_task("sft", DataSection(task="sft", path=str(p), max_length=32))
    ex = task.encode(task.rows()["train"][:6], tok)
    model = _lora(tiny_llama_model(tiny_lm_dir)).train()
    batch = task.collate(ex)
    vocab = model.config.vocab_size
    monkeypatch.setattr(fastlogits, "CHUNK_ELEMENTS", 3 * vocab)  # 3 rows of logits at a time
    seen = []
    h = model.lm_head.register_forward_hook(lambda m, a, o: seen.append(o.shape))
    loss, _ = task.forward(model, batch)
    loss.backward()
    h.remove()
    n_tok = int((batch["labels"][:, 1:] != -100).sum())
    assert n_tok > 6
    assert max(s[0] for s in seen if len(s) == 2) <= 3  # never more than a chunk of rows
    assert sum(s[0] for s in seen if len(s) == 2) == 2 * n_tok  # forward + recomputation in the backward
    g_fast = _grads(model)
    model.zero_grad()
    lp, m = _ref_token_logps(model, batch)
    ref = -lp.sum() / m.sum()
    ref.float().backward()
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    for n, g in _grads(model).items():
        torch.testing.assert_close(g_fast[n], g, rtol=1e-4, atol=1e-6)
    model.eval()
    with torch.no_grad():
        lp, m = _ref_token_logps(model, task.padded(ex))
    got = task.evaluate(model, tok, ex, batch_size=4)
    assert got["loss"] == pytest.approx(float(-lp.sum() / m.sum()), rel=1e-5)


def test_dpo_pair_equals_the_full_logits_path(tiny_lm_dir, tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in _pairs(12)))
    tok = _tok(tiny_lm_dir)
    task = get_task("dpo", DataSection(task="dpo", path=str(p), dpo_beta=0.2, max_length=32))
    ex = task.encode(task.rows()["train"][:4], tok)
    model = _lora(tiny_llama_model(tiny_lm_dir)).train()
    batch = task.collate(ex)
    loss, stats, _ = task._pair(model, batch)
    with torch.no_grad():
        lp, _ = _ref_token_logps(model.eval(), batch)
        with lorakit.disabled(model):
            rp, _ = _ref_token_logps(model, batch)
    pc, pr = lp.sum(1).chunk(2)
    rc, rr = rp.sum(1).chunk(2)
    margin = 0.2 * ((pc - rc) - (pr - rr))
    assert float(loss) == pytest.approx(float(-F.logsigmoid(margin).mean()), rel=1e-5, abs=1e-7)
    assert float(stats["rewards/margin"]) == pytest.approx(float(margin.mean()), rel=1e-4, abs=1e-6)
