"""LoftQ's initialisation (Li et al. 2023, arXiv:2310.08659) for LoRA's ``init="loftq"``: alternate between
quantising the residual and a truncated SVD of the quantisation error."""
from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def quant_dequant(w: Tensor, bits: int) -> Tensor:
    """``deq(quant(w))`` as bitsandbytes stores a LoftQ base: 4 bits = NF4 in blocks of 64 with fp32 absmax
    (``Params4bit(compress_statistics=False)``), 8 bits = row-wise absmax int8 (``Int8Params``)."""
    if bits == 4:
        from .. import quant

        qc = quant.QuantConfig(bits=4, block=64, double=False)
        return quant.dequantize(quant.quantize(w, qc), qc, tuple(w.shape))
    stats = w.abs().amax(1).float()
    q = torch.round(w * (127.0 / stats[:, None])).to(torch.int8)
    return q.float() * stats[:, None] * 7.874015718698502e-3


@torch.no_grad()
def loftq(weight: Tensor, r: int, bits: int, n_iter: int) -> tuple[Tensor, Tensor, Tensor]:
    """LoftQ's alternation: ``Q = deq(quant(W − LR))``, ``LR`` = top-r SVD of ``W − Q`` (``L = U√σ``, ``R = √σVᵀ``).
    Returns ``(Q, L (d_out, r), R (r, d_in))`` in fp32."""
    W = weight.float()
    res = W
    for i in range(n_iter):
        Q = quant_dequant(res, bits)
        U, S, Vh = torch.linalg.svd(W - Q, full_matrices=False)
        root = S[:r].sqrt()
        L, R = U[:, :r] * root, root[:, None] * Vh[:r]
        if i + 1 < n_iter:
            res = W - L @ R
    return Q, L, R
