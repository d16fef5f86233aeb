"""LS-LLaMA / LS-unLLaMA (task kind head-classify): the pooled head against transformers and the paper's formulas."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from lorakit.errors import ConfigError
from lorakit.tasks.head import head_logits, set_bidirectional

PAD = 0


def tiny(attn="sdpa", labels=3, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, pad_token_id=PAD, num_labels=labels, max_position_embeddings=64)
    cfg._attn_implementation = attn
    m = LlamaForSequenceClassification(cfg).eval()
    torch.nn.init.normal_(m.score.weight, std=0.5)
    return m


def batch(right=True):
    rows = [[5, 9, 12, 7, 3, 22], [17, 4, 8], [30, 31, 32, 33]]
    n = max(map(len, rows))
    ids = [(r + [PAD] * (n - len(r))) if right else ([PAD] * (n - len(r)) + r) for r in rows]
    mask = [([1] * len(r) + [0] * (n - len(r))) if right else ([0] * (n - len(r)) + [1] * len(r)) for r in rows]
    return rows, torch.tensor(ids), torch.tensor(mask)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("right", [True, False])
def test_causal_last_token_equals_transformers_sequence_classifier(attn, right):
    m = tiny(attn)
    _, ids, mask = batch(right)
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=mask).logits
        ours = head_logits(m, ids, mask, "last")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_mean_and_max_pool_the_per_token_logits_of_the_real_tokens_only(pooling):
    """Each padded row equals its unpadded forward pooled by the formula written here (head per token, then pool)."""
    m = tiny()
    rows, ids, mask = batch()
    with torch.no_grad():
        ours = head_logits(m, ids, mask, pooling)
        for i, r in enumerate(rows):
            h = m.model(input_ids=torch.tensor([r])).last_hidden_state[0]  # (T, d), alone: no padding at all
            z = h @ m.score.weight.T  # (T, C)
            want = z.mean(0) if pooling == "mean" else z.max(0).values
            torch.testing.assert_close(ours[i], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_unmasked_attention_is_full_attention_over_the_non_padding_tokens(attn):
    """LS-unLLaMA: the same as the causal model given an explicit 4-D mask that lets every query see every real key;
    and a later token then changes the first position's hidden state (it cannot under the causal mask)."""
    m = tiny(attn)
    rows, ids, mask = batch()
    n = ids.shape[1]
    full = torch.zeros(len(rows), 1, n, n)
    full.masked_fill_(mask[:, None, None, :] == 0, torch.finfo(torch.float32).min)  # padding keys only
    with torch.no_grad():
        want = m.model(input_ids=ids, attention_mask=full).last_hidden_state  # causal config, our 4-D mask
        causal = head_logits(m, ids, mask, "mean")
        set_bidirectional(m)
        got = m.model(input_ids=ids, attention_mask=mask, is_causal=False).last_hidden_state
        for i, r in enumerate(rows):
            torch.testing.assert_close(got[i, :len(r)], want[i, :len(r)], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(head_logits(m, ids, mask, "mean"), causal)
        # no padding at all (SDPA then skips the mask and would fall back to its causal flag)
        one = torch.tensor([rows[0]])
        h1 = m.model(input_ids=one, is_causal=False).last_hidden_state[0, 0]
        one2 = one.clone()
        one2[0, -1] = 40
        h2 = m.model(input_ids=one2, is_causal=False).last_hidden_state[0, 0]
        assert not torch.allclose(h1, h2)
        head_logits(m, one, torch.ones_like(one), "last")  # runs without a mask argument problem
        set_bidirectional(m, False)
        c1 = m.model(input_ids=one).last_hidden_state[0, 0]
        c2 = m.model(input_ids=one2).last_hidden_state[0, 0]
        torch.testing.assert_close(c1, c2)


def test_bad_pooling_and_kind_mismatch_are_config_errors():
    from lorakit.train import resolve

    with pytest.raises(ConfigError, match="data.pooling"):
        resolve(overrides=["data.task=sentiment-smollm2-head", "data.pooling=sum"])
    with pytest.raises(ConfigError, match="head-classify"):
        resolve(overrides=["data.task=sentiment-smollm2", "data.attention=bidirectional"])
    cfg = resolve(overrides=["data.task=bbc-smollm2-head", "data.pooling=max", "data.attention=bidirectional"])
    assert (cfg.data.pooling, cfg.data.attention) == ("max", "bidirectional")
