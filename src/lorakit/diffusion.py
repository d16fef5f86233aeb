"""Composing several image LoRAs in a diffusion UNet at inference: CLoRA and LoRA-Composer (diffusers).

Both take a ``diffusers`` ``UNet2DConditionModel`` carrying one lorakit adapter per concept (``lorakit.attach(unet,
cfg, name=...)`` or ``lorakit.load_adapter``), a scheduler, and *prompt embeddings* (from the pipeline's text
encoder: ``pipe.encode_prompt``), so no tokenizer or checkpoint is built into lorakit; ``docs/generation.md`` shows
the calls on a real Stable Diffusion checkpoint. Attention is computed by :class:`ComposeAttnProcessor`, installed
for the duration of a call and removed after (the UNet's own processors come back).

**CLoRA** (Meral et al. 2024, "CLoRA: A Contrastive Approach to Compose Multiple LoRA Models", arXiv:2403.19776),
:func:`clora_sample`. Per denoising step: (1) for the first ``opt_steps`` steps, the cross-attention maps of each
concept's tokens are collected from one UNet pass per concept LoRA (its own prompt) and one pass of the base model
(the composed prompt); a contrastive InfoNCE loss (temperature τ) pulls each concept's LoRA map towards the base
map of the same concept and away from every other concept's maps; the latent takes one gradient step (Attend-and-
Excite style, ``step_size``). (2) Without gradients, the concept maps of this step (normalised to [0, 1]) are
thresholded into masks ``M_j`` and the noise predictions fused: ``ε = (1 − ∪M)·ε_base + Σ_j M_j·ε_j / max(1, ΣM)``.
Decisions: maps are the head- and layer-mean of the cross-attention probabilities of the concept tokens, resized to
the latent resolution; the threshold applies to each map divided by its maximum; classifier-free guidance wraps the
fused prediction (``guidance_scale`` with ``negative_embeds``).

**LoRA-Composer** (Yang et al. 2024, "LoRA-Composer: Leveraging Low-Rank Adaptation for Multi-Concept
Customization in Training-Free Diffusion Models", arXiv:2403.11627), :func:`composer_sample`, with user boxes per
concept: (1) *concept injection*: in each concept's pass (its LoRA and prompt), the concept's tokens may only be
attended to from inside its box (cross-attention mask) and its prediction fills its box; (2) *concept isolation*:
in self-attention, positions inside one concept's box do not attend to positions inside another concept's box
(block-diagonal per region; background positions attend everywhere); (3) *latent re-initialisation*: the initial
latent inside each box is re-drawn from the concept's own seed. The base model with the global prompt fills the
background. Decisions: boxes are given at latent resolution (fractions of the image), resized per attention layer
by nearest neighbour; overlapping boxes average their concepts; the official per-region prompt parser is left to
the caller (pass the concept prompts' embeddings and token indices).

Invariants (tests/test_diffusion_compose.py): one concept whose mask/box covers the image reproduces single-LoRA
sampling; CLoRA with ``step_size=0`` is plain masked fusion; the isolation mask is block-diagonal per region.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, LorakitError

__all__ = ["ComposeAttnProcessor", "Concept", "clora_sample", "composer_sample", "isolation_mask", "box_mask"]


@dataclass
class Concept:
    """One concept: the adapter ``name`` on the UNet, its prompt embeddings (1, L, d), the indices of its concept
    tokens in that prompt (``token_idx``) and in the composed/base prompt (``base_token_idx``, CLoRA), its box
    ``(x0, y0, x1, y1)`` as fractions of the image (LoRA-Composer) and its latent seed."""

    name: str
    embeds: Tensor
    token_idx: list[int]
    base_token_idx: list[int] = field(default_factory=list)
    box: tuple[float, float, float, float] | None = None
    seed: int | None = None


class _State:
    def __init__(self, latent_hw: tuple[int, int]):
        self.latent_hw = latent_hw
        self.capture: list[int] | None = None  # token indices whose cross-attention maps are collected
        self.maps: list[Tensor] = []
        self.cross_allow: Tensor | None = None  # (h, w) bool: where the masked tokens may be attended from
        self.cross_tokens: list[int] = []
        self.regions: Tensor | None = None  # (R, h, w) bool: isolation regions

    def layer_hw(self, q_len: int) -> tuple[int, int]:
        h, w = self.latent_hw
        f = math.sqrt(h * w / q_len)
        hh, ww = round(h / f), round(w / f)
        if hh * ww != q_len:
            raise LorakitError(f"attention layer with {q_len} positions does not match the latent {h}x{w}")
        return hh, ww


def _resize(mask: Tensor, hw: tuple[int, int]) -> Tensor:
    """(…, h, w) bool/float -> (…, hh, ww) by nearest neighbour."""
    lead = mask.shape[:-2]
    m = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    return F.interpolate(m, size=hw, mode="nearest").reshape(*lead, *hw)


class ComposeAttnProcessor:
    """diffusers' plain attention (``AttnProcessor``) plus lorakit's composition hooks: capture of cross-attention
    maps, a cross-attention mask for concept tokens, and a self-attention isolation mask."""

    def __init__(self, state: _State):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        st = self.state
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = hidden_states.shape if not cross else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        q_len = query.shape[1]
        if not cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query, key, value = (attn.head_to_batch_dim(t) for t in (query, key, value))
        extra = self._mask(cross, q_len, key.shape[1], query.dtype, query.device)
        if extra is not None:
            attention_mask = extra if attention_mask is None else attention_mask + extra
        probs = attn.get_attention_scores(query, key, attention_mask)
        if cross and st.capture:
            hw = st.layer_hw(q_len)
            p = probs.view(-1, attn.heads, q_len, key.shape[1]).mean(1)[..., st.capture]  # (B, Q, T)
            st.maps.append(_resize(p.mean(-1).view(-1, *hw), st.latent_hw))  # (B, h, w), tokens averaged
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _mask(self, cross: bool, q_len: int, k_len: int, dtype, device) -> Tensor | None:
        st = self.state
        neg = torch.finfo(dtype).min
        if cross and st.cross_allow is not None and st.cross_tokens:
            allow = _resize(st.cross_allow, st.layer_hw(q_len)).reshape(q_len).bool().to(device)
            m = torch.zeros(q_len, k_len, dtype=dtype, device=device)
            rows = (~allow).nonzero().flatten()
            if rows.numel():
                m[rows[:, None], torch.tensor(st.cross_tokens, device=device)[None, :]] = neg
            return m[None]
        if not cross and st.regions is not None:
            keep = isolation_mask(_resize(st.regions, st.layer_hw(q_len)).reshape(st.regions.shape[0], q_len).bool())
            m = torch.zeros(q_len, q_len, dtype=dtype, device=device)
            m.masked_fill_(~keep.to(device), neg)
            return m[None]
        return None


def isolation_mask(regions: Tensor) -> Tensor:
    """(R, Q) bool region membership -> (Q, Q) bool "may attend": a position inside a region attends to its own
    region and to the background, never to another region's positions; background positions attend everywhere."""
    R, Q = regions.shape
    member = regions.float()
    same = (member.t() @ member) > 0  # share a region
    in_any = regions.any(0)
    blocked = in_any[:, None] & in_any[None, :] & ~same  # both in regions, no region in common
    return ~blocked


def box_mask(box: tuple[float, float, float, float], hw: tuple[int, int]) -> Tensor:
    """(h, w) bool of a box given as fractions ``(x0, y0, x1, y1)`` of the image."""
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ConfigError(f"box {box} must be fractions 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1")
    h, w = hw
    m = torch.zeros(h, w, dtype=torch.bool)
    m[int(round(y0 * h)):max(int(round(y1 * h)), int(round(y0 * h)) + 1),
      int(round(x0 * w)):max(int(round(x1 * w)), int(round(x0 * w)) + 1)] = True
    return m


@contextlib.contextmanager
def _processors(unet: nn.Module, state: _State):
    prev = unet.attn_processors
    unet.set_attn_processor(ComposeAttnProcessor(state))
    try:
        yield
    finally:
        unet.set_attn_processor(prev)


@contextlib.contextmanager
def _only(unet: nn.Module, name: str | None):
    """Run with exactly adapter ``name`` active (None: the base UNet)."""
    from .inject import hosts

    saved = [(h, h.active) for _, h in hosts(unet)]
    try:
        for h, _ in saved:
            h.active = (name,) if name is not None and name in h.adapters else ()
        yield
    finally:
        for h, act in saved:
            h.active = act


def _check(unet: nn.Module, concepts: list[Concept]) -> None:
    from .inject import hosts

    names = {n for _, h in hosts(unet) for n in h.adapters}
    for c in concepts:
        if c.name not in names:
            raise ConfigError(f"concept adapter {c.name!r} is not attached to the UNet (attached: {sorted(names)})")
        if not c.token_idx:
            raise ConfigError(f"concept {c.name!r} needs the indices of its tokens in its prompt (token_idx)")


def _eps(unet, z, t, embeds) -> Tensor:
    return unet(z, t, encoder_hidden_states=embeds).sample


def _guided(unet, z, t, cond_eps, negative_embeds, guidance_scale, state, name=None):
    if negative_embeds is None or guidance_scale == 1.0:
        return cond_eps
    with _only(unet, name):
        unc = _eps(unet, z, t, negative_embeds)
    return unc + guidance_scale * (cond_eps - unc)


def _norm01(m: Tensor) -> Tensor:
    return m / m.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)


def clora_sample(unet: nn.Module, scheduler: Any, base_embeds: Tensor, concepts: list[Concept], *,
                 latents: Tensor, steps: int = 50, opt_steps: int = 10, step_size: float = 20.0,
                 temperature: float = 0.5, threshold: float = 0.5, negative_embeds: Tensor | None = None,
                 guidance_scale: float = 1.0) -> Tensor:
    """CLoRA sampling; returns the final latents (decode them with the pipeline's VAE)."""
    _check(unet, concepts)
    if steps < 1 or opt_steps < 0 or step_size < 0 or temperature <= 0:
        raise ConfigError("clora: steps >= 1, opt_steps >= 0, step_size >= 0, temperature > 0")
    hw = tuple(latents.shape[-2:])
    state = _State(hw)
    scheduler.set_timesteps(steps)
    z = latents.clone()
    with _processors(unet, state):
        for i, t in enumerate(scheduler.timesteps):
            if i < opt_steps and step_size > 0 and len(concepts) > 0:
                z = z.detach().requires_grad_(True)
                with torch.enable_grad():
                    lora_maps, base_maps = [], []
                    for c in concepts:
                        state.capture, state.maps = c.token_idx, []
                        with _only(unet, c.name):
                            _eps(unet, z, t, c.embeds)
                        lora_maps.append(torch.stack(state.maps).mean(0)[0])
                    state.capture = None
                    for c in concepts:
                        state.capture, state.maps = c.base_token_idx or c.token_idx, []
                        with _only(unet, None):
                            _eps(unet, z, t, base_embeds)
                        base_maps.append(torch.stack(state.maps).mean(0)[0])
                    state.capture = None
                    loss = contrastive_loss(lora_maps, base_maps, temperature)
                    g, = torch.autograd.grad(loss, z)
                z = (z - step_size * g).detach()
            with torch.no_grad():
                with _only(unet, None):
                    eps_base = _eps(unet, z, t, base_embeds)
                eps_c, masks = [], []
                for c in concepts:
                    state.capture, state.maps = c.token_idx, []
                    with _only(unet, c.name):
                        eps_c.append(_eps(unet, z, t, c.embeds))
                    masks.append((_norm01(torch.stack(state.maps).mean(0)) >= threshold).to(z.dtype))  # (B,h,w)
                state.capture = None
                eps = fuse(eps_base, eps_c, masks)
                eps = _guided(unet, z, t, eps, negative_embeds, guidance_scale, state)
                z = scheduler.step(eps, t, z).prev_sample
    return z.detach()


def contrastive_loss(lora_maps: list[Tensor], base_maps: list[Tensor], temperature: float) -> Tensor:
    """InfoNCE over attention maps: for concept j the positive pair is (its LoRA map, its base map); every other
    concept's maps (LoRA and base) are negatives. Cosine similarity / τ; mean over concepts and both anchors."""
    n = len(lora_maps)
    feats = F.normalize(torch.stack([m.flatten() for m in lora_maps + base_maps]), dim=1)  # (2n, hw)
    sim = feats @ feats.t() / temperature
    losses = []
    for j in range(n):
        for a, p in ((j, n + j), (n + j, j)):
            others = [k for k in range(2 * n) if k != a]
            logits = sim[a, others]
            target = others.index(p)
            losses.append(-logits.log_softmax(0)[target])
    return torch.stack(losses).mean()


def fuse(eps_base: Tensor, eps_concepts: list[Tensor], masks: list[Tensor]) -> Tensor:
    """``(1 − ∪M)·ε_base + Σ_j M_j·ε_j / max(1, Σ_j M_j)`` with masks (B, h, w) in {0, 1}."""
    if not eps_concepts:
        return eps_base
    M = torch.stack(masks)[:, :, None]  # (J, B, 1, h, w)
    total = M.sum(0)
    union = (total > 0).to(eps_base.dtype)
    mixed = (M * torch.stack(eps_concepts)).sum(0) / total.clamp_min(1)
    return (1 - union) * eps_base + union * mixed


def composer_sample(unet: nn.Module, scheduler: Any, global_embeds: Tensor, concepts: list[Concept], *,
                    latents: Tensor, steps: int = 50, isolate: bool = True, inject: bool = True,
                    reinit: bool = True, negative_embeds: Tensor | None = None, guidance_scale: float = 1.0
                    ) -> Tensor:
    """LoRA-Composer sampling with a box per concept; returns the final latents."""
    _check(unet, concepts)
    hw = tuple(latents.shape[-2:])
    for c in concepts:
        if c.box is None:
            raise ConfigError(f"LoRA-Composer needs a box for concept {c.name!r}")
    regions = torch.stack([box_mask(c.box, hw) for c in concepts])  # (R, h, w)
    z = latents.clone()
    if reinit:
        for c, r in zip(concepts, regions):
            if c.seed is not None:
                g = torch.Generator(device="cpu").manual_seed(c.seed)
                fresh = torch.randn(z.shape, generator=g, dtype=z.dtype).to(z.device)
                z = torch.where(r.to(z.device), fresh, z)
    state = _State(hw)
    scheduler.set_timesteps(steps)
    masks = [r[None].expand(z.shape[0], *hw).to(z.dtype) for r in regions]
    with _processors(unet, state), torch.no_grad():
        for t in scheduler.timesteps:
            state.regions = regions if isolate else None
            with _only(unet, None):
                eps_base = _eps(unet, z, t, global_embeds)
            eps_c = []
            for c, r in zip(concepts, regions):
                if inject:
                    state.cross_allow, state.cross_tokens = r, list(c.token_idx)
                with _only(unet, c.name):
                    eps_c.append(_eps(unet, z, t, c.embeds))
                state.cross_allow, state.cross_tokens = None, []
            state.regions = None
            eps = fuse(eps_base, eps_c, masks)
            eps = _guided(unet, z, t, eps, negative_embeds, guidance_scale, state)
            z = scheduler.step(eps, t, z).prev_sample
    return z
