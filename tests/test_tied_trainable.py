"""A trainable copy of a tied module (input embedding shared with the output head) unties them: attach says so,
naming the other user, and says nothing when both are listed or nothing is tied."""
from __future__ import annotations

import logging

import torch

import lorakit
from conftest import tiny_llama


def _attach(model, trainable):
    return lorakit.attach(model, {"method": "lora", "targets": ["q_proj"], "r": 2, "trainable": trainable})


def test_training_a_tied_embedding_warns_that_the_head_stays_frozen(caplog):
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with caplog.at_level(logging.WARNING, logger="lorakit.inject"):
        _attach(model, ["embed_tokens"])
    msgs = [r.getMessage() for r in caplog.records if "tied weights" in r.getMessage()]
    assert len(msgs) == 1 and "lm_head" in msgs[0] and "embed_tokens" in msgs[0]
    # and what it says is true: a step moves the embedding copy, not the head
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    head = model.lm_head.weight.detach().clone()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert torch.equal(model.lm_head.weight, head)


def test_no_warning_when_both_tied_users_are_listed_or_nothing_is_tied(caplog):
    with caplog.at_level(logging.WARNING, logger="lorakit.inject"):
        _attach(tiny_llama(tie_word_embeddings=True), ["embed_tokens", "lm_head"])
        _attach(tiny_llama(tie_word_embeddings=False), ["embed_tokens"])
    assert not [r for r in caplog.records if "tied weights" in r.getMessage()]


def test_the_arenas_budget_probes_do_not_repeat_the_warning(caplog):
    from lorakit.arena.budget import trainable_count

    def meta():
        with torch.device("meta"):
            return tiny_llama(tie_word_embeddings=True)

    cfg = {"method": "lora", "targets": ["q_proj"], "r": 2, "trainable": ["embed_tokens"]}
    with caplog.at_level(logging.WARNING, logger="lorakit.inject"):
        n = trainable_count(meta, cfg)
        assert not [r for r in caplog.records if "tied weights" in r.getMessage()]
        model = tiny_llama(tie_word_embeddings=True)
        assert n == sum(p.numel() for p in lorakit.attach(model, cfg).parameters() if p.requires_grad)
    # the run's own attach still says it, once
    assert len([r for r in caplog.records if "tied weights" in r.getMessage()]) == 1
