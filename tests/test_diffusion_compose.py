"""CLoRA and LoRA-Composer on a tiny randomly initialised diffusers UNet: the invariants of the references (one
concept covering the image = single-LoRA sampling; block-diagonal isolation; injection mask; InfoNCE by hand)."""
import pytest
import torch

import lorakit

diffusers = pytest.importorskip("diffusers")
from lorakit import diffusion as D  # noqa: E402


def _unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    u = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                             block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                             attention_head_dim=8, norm_num_groups=8).eval()
    for name, seed in (("c1", 1), ("c2", 2)):
        torch.manual_seed(seed)
        lorakit.attach(u, {"method": "lora", "targets": ["to_q", "to_k", "to_v", "to_out.0"], "r": 2}, name=name)
        with torch.no_grad():
            for _, a in lorakit.adapters(u, name):
                a.lora_B.weight.normal_(std=0.5)
    return u


def _sched():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=100)


def _emb(seed):
    return torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(seed))


def _single(unet, name, embeds, z, steps):
    s = _sched()
    s.set_timesteps(steps)
    with torch.no_grad(), D._only(unet, name):
        for t in s.timesteps:
            z = s.step(unet(z, t, encoder_hidden_states=embeds).sample, t, z).prev_sample
    return z


def test_isolation_mask_is_block_diagonal_and_injection_masks_outside_the_box():
    regions = torch.zeros(2, 6, dtype=torch.bool)
    regions[0, :2] = True
    regions[1, 2:4] = True  # positions 4, 5: background
    keep = D.isolation_mask(regions)
    assert keep[:2, :2].all() and keep[2:4, 2:4].all()
    assert not keep[:2, 2:4].any() and not keep[2:4, :2].any()
    assert keep[4:].all() and keep[:, 4:].all()
    st = D._State((4, 4))
    st.cross_allow, st.cross_tokens = D.box_mask((0, 0, 0.5, 0.5), (4, 4)), [2, 3]
    m = D.ComposeAttnProcessor(st)._mask(True, 16, 6, torch.float32, "cpu")[0]
    inside = D.box_mask((0, 0, 0.5, 0.5), (4, 4)).reshape(16)
    assert (m[~inside][:, [2, 3]] < -1e30).all() and (m[inside] == 0).all() and (m[:, [0, 1, 4, 5]] == 0).all()


def test_contrastive_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    L = [torch.rand(4, 4, generator=g) for _ in range(2)]
    B = [torch.rand(4, 4, generator=g) for _ in range(2)]
    f = torch.nn.functional.normalize(torch.stack([m.flatten() for m in L + B]), dim=1)
    tau, total = 0.5, []
    for a, p in ((0, 2), (2, 0), (1, 3), (3, 1)):
        num = torch.exp(f[a] @ f[p] / tau)
        den = sum(torch.exp(f[a] @ f[k] / tau) for k in range(4) if k != a)
        total.append(-torch.log(num / den))
    assert torch.allclose(D.contrastive_loss(L, B, tau), torch.stack(total).mean(), atol=1e-6)


def test_clora_one_concept_all_ones_mask_is_single_lora_and_optimisation_moves_latents():
    unet = _unet()
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    c = D.Concept("c1", _emb(1), token_idx=[2], base_token_idx=[2])
    got = D.clora_sample(unet, _sched(), _emb(0), [c], latents=z0, steps=2, opt_steps=0, threshold=0.0)
    ref = _single(unet, "c1", _emb(1), z0, 2)
    assert (got - ref).abs().max() < 1e-4, (got - ref).abs().max()  # diffusers' SDPA vs explicit softmax
    two = [c, D.Concept("c2", _emb(2), token_idx=[4], base_token_idx=[4])]
    plain = D.clora_sample(unet, _sched(), _emb(0), two, latents=z0, steps=2, opt_steps=0, threshold=0.6)
    zero_step = D.clora_sample(unet, _sched(), _emb(0), two, latents=z0, steps=2, opt_steps=1, step_size=0.0,
                               threshold=0.6)
    # step 0: plain masked fusion (to rounding: LoRA's fused inference GEMM starts after the first no-grad forward)
    assert torch.allclose(plain, zero_step, atol=1e-4)  # (rounding differs by CPU kernel: ~1e-4 seen on one)
    moved = D.clora_sample(unet, _sched(), _emb(0), two, latents=z0, steps=2, opt_steps=1, step_size=50.0,
                           threshold=0.6)
    assert not torch.allclose(moved, plain)
    # the adapters' own state is untouched (processors and active set restored)
    assert all(type(p).__name__ != "ComposeAttnProcessor" for p in unet.attn_processors.values())


def test_composer_one_whole_box_is_single_lora_and_two_concepts_run():
    unet = _unet()
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    c = D.Concept("c1", _emb(1), token_idx=[2], box=(0, 0, 1, 1), seed=11)
    got = D.composer_sample(unet, _sched(), _emb(0), [c], latents=z0, steps=2)
    start = torch.randn(z0.shape, generator=torch.Generator().manual_seed(11))
    assert (got - _single(unet, "c1", _emb(1), start, 2)).abs().max() < 1e-4
    two = [D.Concept("c1", _emb(1), token_idx=[2], box=(0, 0, 0.5, 1), seed=11),
           D.Concept("c2", _emb(2), token_idx=[3], box=(0.5, 0, 1, 1), seed=12)]
    out = D.composer_sample(unet, _sched(), _emb(0), two, latents=z0, steps=1)
    assert out.shape == z0.shape and torch.isfinite(out).all()
    with pytest.raises(lorakit.LorakitError, match="not attached"):
        D.composer_sample(unet, _sched(), _emb(0), [D.Concept("nope", _emb(1), [1], box=(0, 0, 1, 1))],
                          latents=z0, steps=1)
