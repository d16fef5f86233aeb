import torch

import lorakit
from conftest import MLP


def attached(method, seed=0, **opts):
    torch.manual_seed(seed)
    m = MLP()
    lorakit.attach(m, {"method": method, "targets": ["lin0", "lin1"], "seed": 0, **opts})
    return m.eval()


def fill(m, std=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, a in lorakit.adapters(m):
            for p in a.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def x(n=6, seed=2):
    return torch.randn(n, 5, 12, generator=torch.Generator().manual_seed(seed))
