"""LLaVA-MoLE against the released LoRA_MOE_LM.forward (forwchen/LLaVA-MoLE moe.py), written out here: one router
(with bias) per MLP block on the block input, its softmax/argmax shared by gate/up/down; dense_moe sums the experts
weighted by p, the sparse path adds the chosen expert's output unweighted; the balance loss is
Σ_e mean(p_e)·mean(onehot_e) over the non-padded tokens of all blocks, times aux_coef (no ×E)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.errors import ConfigError


class Block(nn.Module):
    def __init__(self, d=12, h=20):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False), \
            nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.b0, self.b1 = Block(), Block()

    def forward(self, x):
        return self.b1(self.b0(x))


def model(**opts):
    torch.manual_seed(0)
    m = Net()
    lorakit.attach(m, {"method": "llava_mole", "targets": ["gate_proj", "up_proj", "down_proj"], "r": 2,
                       "alpha": 4.0, "num_experts": 3, "dropout": 0.0, "seed": 0, **opts})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, a in lorakit.adapters(m):
            for p in a.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m


def official_block(blk, ads, x, dense, s):
    """LoRA_MOE_LM.forward with the adapters' tensors (router of gate_proj's adapter, the block's router)."""
    router = ads["gate_proj"].router
    routing = F.softmax(F.linear(x, router.weight, router.bias), dim=-1)
    index = routing.max(-1, keepdim=True)[1]

    def proj(name, inp):
        a, base = ads[name], getattr(blk, name).base_layer
        outs = torch.stack([(inp @ a.experts_A[e].T @ a.experts_B[e].T) * s for e in range(3)], 2)
        if dense:
            lora = (outs * routing[:, :, :, None]).sum(2)
        else:
            lora = outs.gather(2, index[..., None].expand(*index.shape[:2], 1, outs.shape[-1])).squeeze(2)
        return base(inp) + lora

    h = F.silu(proj("gate_proj", x)) * proj("up_proj", x)
    return proj("down_proj", h), routing, index


@pytest.mark.parametrize("dense", [True, False])
def test_block_router_and_forward_match_the_released_code(dense):
    m = model(dense_moe=dense).eval()
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(3))
    ads = dict(lorakit.adapters(m))
    with torch.no_grad():
        got = m(x)
        h = x
        for b in ("b0", "b1"):
            h, _, _ = official_block(getattr(m, b), {k.split(".")[-1]: v for k, v in ads.items() if k.startswith(b)},
                                     h, dense, 2.0)
    # two summation orders of the same formula: fp32 rounding differs by CPU kernel (~1e-5 relative), a wrong
    # router or scale by O(1)
    torch.testing.assert_close(got, h, rtol=1e-4, atol=1e-5)
    # one router (with bias) per block, owned by the first projection; the others have none
    routers = {p: a.router for p, a in ads.items()}
    assert [p for p, r in routers.items() if r is not None] == ["b0.gate_proj", "b1.gate_proj"]
    assert routers["b0.gate_proj"].bias is not None


def test_balance_loss_pools_blocks_and_skips_padding_without_E_factor():
    coef = 0.3
    m = model(dense_moe=False, aux_coef=coef).train()
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 2:] = 0
    with lorakit.batch_context(m, attention_mask=mask):
        m(x)
        got = lorakit.extra_loss(m)
    ads = dict(lorakit.adapters(m))
    with torch.no_grad():
        P, H = [], []
        h = x
        for b in ("b0", "b1"):
            h, routing, index = official_block(getattr(m, b), {k.split(".")[-1]: v for k, v in ads.items()
                                                               if k.startswith(b)}, h, False, 2.0)
            keep = mask.reshape(-1) == 1
            P.append(routing.reshape(-1, 3)[keep])
            H.append(F.one_hot(index.squeeze(-1), 3).float().reshape(-1, 3)[keep])
        ref = coef * (torch.cat(P).mean(0) * torch.cat(H).mean(0)).sum()
    torch.testing.assert_close(got.detach(), ref, rtol=1e-5, atol=1e-6)
    assert got.requires_grad  # the router learns from the balance loss (through p)


def test_sparse_forward_gives_the_router_no_gradient_dense_does():
    for dense, has in ((False, False), (True, True)):
        m = model(dense_moe=dense, aux_coef=0.0).train()
        m(torch.randn(2, 5, 12)).pow(2).sum().backward()
        g = dict(lorakit.adapters(m))["b0.gate_proj"].router.weight.grad
        assert (g is not None and bool(g.abs().sum() > 0)) == has


def test_top_k_other_than_one_is_refused():
    with pytest.raises(ConfigError, match="top_k=2"):
        model(top_k=2)
