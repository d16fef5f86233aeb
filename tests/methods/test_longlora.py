"""LongLoRA's S²-Attn (arXiv:2309.12307) against references written here: grouped causal attention per group, the
half-head shift by G/2 that wraps and is undone, coverage of every token, full attention at inference."""
import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit.methods.longlora import s2_attention_core
from conftest import tiny_llama


def _naive(q, k, v, group, shift):
    """Per head: permute the sequence (roll for shifted heads), block-diagonal causal mask, softmax, un-permute."""
    B, H, N, D = q.shape
    out = torch.empty_like(q)
    pos = torch.arange(N)
    blockmask = (pos[:, None] // group == pos[None, :] // group) & (pos[None, :] <= pos[:, None])
    for h in range(H):
        by = -(group // 2) if shift and h >= H // 2 else 0
        perm = torch.roll(pos, by)  # new position i holds original token perm[i]
        qs, ks, vs = q[:, h, perm], k[:, h, perm], v[:, h, perm]
        s = qs @ ks.transpose(-1, -2) / D ** 0.5
        s = s.masked_fill(~blockmask, float("-inf"))
        o = torch.softmax(s, -1) @ vs
        out[:, h, perm] = o
    return out


@pytest.mark.parametrize("shift", [False, True])
def test_s2_attention_matches_the_reference(shift):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8, generator=g) for _ in range(3))
    got = s2_attention_core(q, k, v, group=4, shift=shift)
    assert torch.allclose(got, _naive(q, k, v, 4, shift), atol=1e-5)


def test_one_group_without_shift_is_full_causal_and_groups_cover_every_token():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 12, 8, generator=g) for _ in range(3))
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(s2_attention_core(q, k, v, group=12, shift=False), full, atol=1e-6)
    # every token of the shifted heads sits in exactly one group: a one-hot value picks itself back out
    N, G = 16, 4
    eye = torch.eye(N).expand(1, 2, N, N)
    qz = torch.zeros(1, 2, N, N)  # uniform attention within the causal group
    out = s2_attention_core(qz, qz, eye, group=G, shift=True)
    reached = (out[0] > 0)
    for h in range(2):
        assert bool(reached[h].diagonal().all())  # each token attends at least to itself
        assert int(reached[h].sum(1).max()) <= G  # and to at most G tokens (its group)
    with pytest.raises(lorakit.LorakitError, match="group size"):
        s2_attention_core(q, k, v, group=0)


def _naive_padded(q, k, v, group, shift):
    """Any N: pad the end to a multiple of G; padded keys take no attention (a query always sees itself); roll the
    padded sequence for the shifted heads; cut the padding from the output."""
    B, H, N, D = q.shape
    M = -(-N // group) * group
    qp, kp, vp = (F.pad(t, (0, 0, 0, M - N)) for t in (q, k, v))
    pos = torch.arange(M)
    out = torch.empty_like(qp)
    for h in range(H):
        by = -(group // 2) if shift and h >= H // 2 else 0
        perm = torch.roll(pos, by)
        valid = perm < N  # the token at new position i is real
        allowed = (pos[:, None] // group == pos[None, :] // group) & (pos[None, :] <= pos[:, None]) \
            & (valid[None, :] | torch.eye(M, dtype=torch.bool))
        s = qp[:, h, perm] @ kp[:, h, perm].transpose(-1, -2) / D ** 0.5
        out[:, h, perm] = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ vp[:, h, perm]
    return out[:, :, :N]


@pytest.mark.parametrize("N,group,shift", [(49, 12, True), (49, 12, False), (13, 4, True), (16, 4, True)])
def test_any_length_trains_padded_to_a_multiple_of_the_group(N, group, shift):
    """A batch whose length is not a multiple of G (variable-length classification batches) runs S²-Attn on the
    padded sequence with the padding masked out; a multiple of G is the unpadded computation unchanged."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, N, 8, generator=g) for _ in range(3))
    got = s2_attention_core(q, k, v, group=group, shift=shift)
    assert got.shape == q.shape and torch.isfinite(got).all()
    assert torch.allclose(got, _naive_padded(q, k, v, group, shift), atol=1e-5)
    if N % group == 0:
        assert torch.allclose(got, _naive(q, k, v, group, shift), atol=1e-5)


def test_training_uses_s2_and_eval_is_the_base_attention():
    torch.manual_seed(0)
    base = tiny_llama(layers=2)
    ref = tiny_llama(layers=2)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y_base = ref(ids).logits
    lorakit.attach(base, {"method": "longlora", "targets": ["q_proj", "k_proj", "v_proj", "o_proj"], "r": 4,
                          "trainable": ["embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"]})
    assert base.config._attn_implementation == "lorakit_s2attn"
    base.eval()
    with torch.no_grad():
        assert torch.allclose(base(ids).logits, y_base, atol=1e-6)  # B = 0 and full attention at inference
    base.train()
    with torch.no_grad():
        y_train = base(ids).logits
    assert not torch.allclose(y_train, y_base, atol=1e-4)  # grouped attention while training
    trainable = {n for n, p in base.named_parameters() if p.requires_grad}
    assert any("embed_tokens" in n for n in trainable) and any("input_layernorm" in n for n in trainable)
    assert any(n.startswith("model.norm") for n in trainable)
    lorakit.detach(base)
    assert base.config._attn_implementation == ref.config._attn_implementation
    assert "_lorakit_s2" not in base.config.__dict__
