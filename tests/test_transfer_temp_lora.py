"""Temp-Lora (lorakit.workflows.temp_lora) on a tiny Llama: the lr=0 invariant, the short window, the base restored,
and the mechanism (a text repeating beyond the window gets easier once the chunks before it are trained on)."""
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.errors import ConfigError
from lorakit.workflows import temp_lora

V = 48


class Tok:
    """The three things the workflow needs from a tokenizer (ids are passed as lists)."""
    eos_token_id = None
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def tiny(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
                      initializer_range=0.2)  # logits far from uniform, so a small adapter can move them
    return LlamaForCausalLM(cfg).eval()


CFG = {"chunk": 6, "window": 5, "epochs": 2, "warmup": 0, "adapter": {"method": "lora", "targets": "all-linear",
                                                                      "r": 4, "alpha": 8, "dropout": 0.0}}


@torch.no_grad()
def windowed_greedy(model, prompt, n, chunk, window):
    """Reference written here: each chunk is decoded token by token from the last `window` tokens before the chunk."""
    ids = list(prompt)
    while len(ids) - len(prompt) < n:
        ctx = ids[-window:]
        for _ in range(min(chunk, n - (len(ids) - len(prompt)))):
            nxt = int(model(input_ids=torch.tensor([ctx])).logits[0, -1].argmax())
            ctx.append(nxt)
            ids.append(nxt)
    return ids[len(prompt):]


def test_lr0_is_token_identical_to_the_base_with_the_same_window_and_training_changes_it():
    model, tok = tiny(), Tok()
    before = temp_lora.state_hash(model)
    prompt = [3, 9, 4, 17, 22, 5, 8]
    base = temp_lora.generate(model, tok, prompt, 20, CFG, train=False)
    assert base["ids"] == windowed_greedy(model, prompt, 20, chunk=6, window=5)
    zero = temp_lora.generate(model, tok, prompt, 20, {**CFG, "lr": 0.0})
    assert zero["ids"] == base["ids"] and len(zero["train_losses"]) == 3  # 4 chunks, the last is not trained on
    trained = temp_lora.generate(model, tok, prompt, 20, {**CFG, "lr": 5e-2, "epochs": 4})
    assert trained["ids"] != base["ids"]  # the invariant above is not vacuous: training does change the output
    assert temp_lora.state_hash(model) == before and not lorakit.attached(model)  # removed, base bit-exact
    assert all(p.requires_grad for p in model.parameters())  # flags as before


def test_base_perplexity_scores_each_chunk_with_the_window_before_it():
    model, tok = tiny(), Tok()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (23,), generator=g).tolist()
    r = temp_lora.perplexity(model, tok, ids, {**CFG, "lr": 0.0})
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids), 6):
            for t in range(max(s, 1), min(s + 6, len(ids))):  # token t sees ids[max(0, s-5) : t]
                lp = model(input_ids=torch.tensor([ids[max(0, s - 5):t]])).logits[0, -1].log_softmax(-1)
                nll -= float(lp[ids[t]])
                n += 1
    assert r["tokens"] == n == len(ids) - 1
    assert r["base_ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert r["ppl"] == r["base_ppl"]  # lr = 0: the temporary adapter is exactly zero


def test_text_repeating_beyond_the_window_gets_easier_with_temp_lora():
    """The mechanism: a 12-token block repeated 4 times, window 4 (the repeat is never visible in context), chunk 12.
    Trained on chunk i, the adapter predicts chunk i+1 (the same block) far better than the base can."""
    model, tok = tiny(), Tok()
    before = temp_lora.state_hash(model)
    block = torch.randint(1, V, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    cfg = {**CFG, "chunk": 12, "window": 4, "epochs": 6, "lr": 3e-2}
    r = temp_lora.perplexity(model, tok, block * 4, cfg)
    assert r["chunks"] == 4
    first, last = r["per_chunk"][0], r["per_chunk"][-1]
    assert first["nll"] == pytest.approx(first["base_nll"], rel=1e-6)  # chunk 0: nothing trained yet
    assert last["nll"] < 0.5 * last["base_nll"]
    assert r["ppl"] < r["base_ppl"]
    assert temp_lora.state_hash(model) == before and not lorakit.attached(model)


def test_any_method_and_bad_options():
    model, tok = tiny(), Tok()
    r = temp_lora.generate(model, tok, [1, 2, 3], 8, {**CFG, "adapter": {"method": "dora", "targets": "all-linear",
                                                                          "r": 2}})
    assert len(r["ids"]) == 8 and not lorakit.attached(model)
    with pytest.raises(ConfigError, match="chunk"):
        temp_lora.make_config({"chunk": 0})
    with pytest.raises(ConfigError, match="unknown key"):
        temp_lora.make_config({"windw": 3})
    with pytest.raises(ConfigError):
        temp_lora.make_config({"adapter": {"method": "nope"}})


def test_packaged_workflow_recipes_validate():
    from lorakit.workflows import transfer
    from lorakit.workflows.cli import workflow_recipe

    d = workflow_recipe(None, "temp-lora", ("model", "temp_lora", "text"), ["temp_lora.lr=0"])
    assert temp_lora.make_config(d["temp_lora"]).lr == 0
    d = workflow_recipe("transfer-sentiment", "x", ("transfer",), ["transfer.seeds=4"])
    assert transfer.make_config(d["transfer"]).seeds == 4
    with pytest.raises(ConfigError, match="unknown section"):
        workflow_recipe(None, "temp-lora", ("model", "temp_lora", "text"), ["bogus.x=1"])
    with pytest.raises(ConfigError, match="not found"):
        workflow_recipe("nope", "nope", ("transfer",), [])
