"""DynMoLE routing and aux loss against the official code (mikecovlee/DynMoLE, ``moe_peft/adapters/dynmole/model.py``
``_dynamic_routing`` / ``_dynamic_load_balancing_loss_func`` and ``moe_peft/common/moe_utils.py``
``tsallis_entropy``), re-implemented here from the router weights and the captured layer inputs."""
import torch

import lorakit
from lorakit.methods.dynmole import tsallis_normalised
from _moe import attached, fill, x


def tsallis(p, q, eps=1e-5):  # official moe_utils.tsallis_entropy(normalize=True)
    N = p.shape[-1]
    return ((1 - (p + eps).pow(q).sum(-1)) / (q - 1)) / ((1 - N ** (1 - q)) / (q - 1))


def dynamic_routing(p, threshold, q, keep_top_k, top_p):  # official _dynamic_routing (on probabilities)
    sp, idx = torch.sort(p, dim=-1, descending=True)
    mask = (sp.cumsum(-1) <= top_p).float()
    mask[..., :keep_top_k] = 1
    final = torch.zeros_like(p).scatter(-1, idx, mask)
    H = tsallis(p, q)
    final[H > threshold] = 1
    return H, final, p * final


def test_entropy_is_the_official_normalised_tsallis():
    p = torch.softmax(torch.randn(7, 5, generator=torch.Generator().manual_seed(0)), -1)
    torch.testing.assert_close(tsallis_normalised(p, 1.1), tsallis(p, 1.1))
    uniform = torch.full((3, 5), 0.2)  # maximal: ≈ 1 (the eps shifts it by ~3e-4)
    torch.testing.assert_close(tsallis_normalised(uniform, 1.1), torch.ones(3), rtol=0, atol=1e-3)


def test_one_loss_over_the_routers_of_all_layers():
    m = attached("dynmole", r=2, num_experts=4)
    fill(m, std=0.3)
    m.train()
    inputs = {}
    hooks = [getattr(m, n).register_forward_hook(lambda mod, inp, out, n=n: inputs.__setitem__(n, inp[0].detach()))
             for n in ("lin0", "lin1")]
    m(x())
    for h in hooks:
        h.remove()
    ads = dict(lorakit.adapters(m))
    rows_p, rows_w, rows_H = [], [], []
    for n in ("lin0", "lin1"):
        logits = inputs[n].reshape(-1, 12 if n == "lin0" else 16) @ ads[n].router.weight.detach().t()
        p = torch.softmax(logits, -1)
        H, mask, w = dynamic_routing(p, 0.9, 1.1, 2, 0.75)
        assert (mask.sum(-1) >= 2).all()  # keep_top_k
        assert (mask.sum(-1)[H > 0.9] == 4).all()  # high entropy: every expert
        assert (H > 0.9).any() and (H <= 0.9).any() and (mask.sum(-1) < 4).any()  # both paths exercised
        torch.testing.assert_close(ads[n]._weights.detach().reshape(-1, 4), w, rtol=1e-5, atol=1e-6)
        rows_p.append(p), rows_w.append(w), rows_H.append(H)
    # unpack_router_logits: torch.cat over layers (dim 0), then one loss over all rows
    p, w, H = torch.cat(rows_p), torch.cat(rows_w), torch.cat(rows_H)
    E = 4
    ref = 0.01 * H.mean() + 0.001 * E * (w.mean(0) * p.mean(0)).sum()
    torch.testing.assert_close(lorakit.extra_loss(m).detach(), ref, rtol=1e-5, atol=1e-7)
    # pooling f and P before their product is not the sum of the per-layer losses
    per_layer = sum(0.01 * h.mean() + 0.001 * E * (ww.mean(0) * pp.mean(0)).sum()
                    for pp, ww, h in zip(rows_p, rows_w, rows_H))
    assert not torch.allclose(ref, per_layer)
