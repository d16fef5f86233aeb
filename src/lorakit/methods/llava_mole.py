"""LLaVA-MoLE: a mixture of LoRA experts in the MLP blocks, one router per block (Chen et al. 2024,
arXiv:2401.16160; released code forwchen/LLaVA-MoLE ``moe.py``, inference only).

One ROUTER PER BLOCK (``router`` = ``nn.Linear(d_model, E)`` with bias, on the block input x) chooses for every token
the expert of ALL the block's adapted projections: in the released ``LoRA_MOE_LM`` the router's ``routing =
softmax(router(x))`` and ``index = argmax`` are computed once and used for gate_proj, up_proj and down_proj alike.
Here the adapters of one attach are grouped by their parent module (``mlp.gate_proj``, ``mlp.up_proj``,
``mlp.down_proj`` -> ``mlp``); the first adapted projection of a block (in module order: gate_proj) owns the router
and routes, the others reuse its routing for the same tokens (they own no router). Each projection has E experts
``A_e`` (r, d_in), ``B_e`` (d_out, r), scale ``s = α/r``:

* ``dense_moe=True`` (the released setting, ``dense_moe = True`` in ``llava_mole_infer.py``):
  ``h = W0 x + Σ_e p_e · s · B_e A_e x`` with ``p = softmax(router(x))`` (``forward_lora_moe``);
* ``dense_moe=False`` (``forward_lora_moe_sparse``, the paper's top-1): ``h = W0 x + s · B_e A_e x`` with
  ``e = argmax p`` -- the chosen expert's output is NOT weighted by its probability, so the router receives no
  gradient through the forward, only through the balance loss.

The straight-through one-hot ``onehot(e) − p.detach() + p`` of the released code is returned beside ``routing`` for
the (unreleased) training loss only; its value is the one-hot, so here the one-hot enters the balance loss
detached (the ``p.detach() − p`` terms cancel in value and the one-hot factor carries no useful gradient).

Balance loss (``extra_loss``/``attach_loss``, × ``aux_coef``): ``Σ_e mean(p_e) · mean(onehot_e)``, the means over
the non-padded tokens of every routed block of the attach pooled together (padding from the batch context's
``attention_mask``, shared by the trainer), without the Switch ``×E`` factor. Trains A, B and the routers.

Released defaults: 3 experts, r = 16, α = 32 (checkpoint ``llava_mole_r16_a32_e3.pt``), expert dropout 0.05, MoE on
the MLP projections only; the released model also has a plain LoRA on q/k/v/o (attach a ``lora`` adapter on the
attention projections beside this one). The training hyper-parameters (aux coefficient, lr) are not released;
``aux_coef`` 0.01 is ours. (Before: one router per projection, the straight-through gate in the forward, E = 4 and a
Switch ``E·Σ f·P`` loss summed over modules.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import register
from ..errors import ConfigError
from ._mixture import MixConfig, Mixture, topk_mask


class _Block:
    """The routing of one block for the current forward, written by the routing adapter, read by the others."""

    def __init__(self, leader_path: str):
        self.leader_path = leader_path
        self.probs: Tensor | None = None
        self.hard: Tensor | None = None


@register("llava_mole", family="mixture of LoRA experts", paper="Chen et al. 2024, LLaVA-MoLE: Sparse Mixture of "
          "LoRA Experts for Mitigating Data Conflicts in Instruction Finetuning MLLMs, arXiv:2401.16160")
class LLaVAMoLE(Mixture):
    __doc__ = __doc__
    example = {"r": 2, "num_experts": 3, "aux_coef": 0.01}
    roles = {"experts_A": "A", "experts_B": "B", "router": "router"}

    @dataclass
    class Config(MixConfig):
        r: int = 16
        alpha: float = 32.0
        num_experts: int = 3
        top_k: int = 1  # fixed: one expert per token (the argmax)
        dropout: float = 0.05
        aux_coef: float = 0.01
        dense_moe: bool = True  # the released setting: softmax-weighted sum of all experts; False: top-1, unweighted

    def __init__(self, base, cfg: Config, view=None):
        if cfg.top_k != 1:
            raise ConfigError(f"llava_mole: top_k={cfg.top_k}; the method routes each token to one expert (top_k 1; "
                              "dense_moe=true for the softmax-weighted sum)")
        super().__init__(base, cfg, view, router=False)
        self.router = nn.Linear(self.view.d_in, self.E, bias=True)  # the block's router (dropped by followers)
        self.__dict__["_block"] = None

    @classmethod
    def share(cls, att) -> None:
        """Group the attach's adapters by parent module; the first of each block routes for the block."""
        blocks: dict[str, _Block] = {}
        for m in att.members:
            if not isinstance(m.adapter, cls):
                continue
            parent = m.path.rsplit(".", 1)[0] if "." in m.path else ""
            blk = blocks.get(parent)
            if blk is None:
                blocks[parent] = blk = _Block(m.path)
            else:
                m.adapter.router = None  # reuses the block's routing: no router of its own
            m.adapter.__dict__["_block"] = blk

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.router is not None:
            self.router.reset_parameters()  # nn.Linear's default init, as the released nn.Linear router

    def routing(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(p, onehot(argmax p))`` for the tokens of ``x``: computed by the block's router, or the block's."""
        blk = self.__dict__["_block"]
        if self.router is not None:
            p = torch.softmax(self.router(x).float(), dim=-1)
            hard = topk_mask(p.detach(), 1)
            if blk is not None:
                blk.probs, blk.hard = p, hard
            return p, hard
        if blk is None or blk.probs is None or blk.probs.shape[:-1] != x.shape[:-1]:
            raise ConfigError(f"llava_mole: this projection reuses the routing of '{blk.leader_path if blk else '?'}' "
                              "(one router per block), which did not route these tokens first; adapt the block's "
                              "first projection (gate_proj) too, and call the block's projections in order")
        return blk.probs, blk.hard

    def delta(self, x: Tensor) -> Tensor:
        x = self.cast_in(x)
        p, hard = self.routing(x)
        if self.router is not None:
            self.record(p, hard)  # the block's routing counts once in the balance loss
            if self.training:
                self._mask = None if self.ctx is None else self.ctx.get("attention_mask")
        return self.mix(self.dropout(x), p if self.cfg.dense_moe else hard)

    def _pooled(self) -> tuple[Tensor, Tensor] | None:
        """This router's ``(p (N, E), onehot (N, E))`` over its non-padded tokens, or None."""
        if self._probs is None:
            return None
        p, h = self._probs, self._weights
        mask = getattr(self, "_mask", None)
        if mask is not None and tuple(mask.shape) == tuple(p.shape[:-1]):
            keep = mask.to(p.device).reshape(-1) != 0
            return p.reshape(-1, self.E)[keep], h.reshape(-1, self.E)[keep]
        return p.reshape(-1, self.E), h.reshape(-1, self.E)

    @staticmethod
    def _balance(parts) -> Tensor | None:
        parts = [q for q in parts if q is not None and q[0].shape[0]]
        if not parts:
            return None
        p = torch.cat([q[0] for q in parts]).float()
        h = torch.cat([q[1] for q in parts]).float()
        return (p.mean(0) * h.mean(0)).sum()

    def balance_loss(self) -> Tensor | None:
        return self._balance([self._pooled()]) if self.router is not None else None

    @classmethod
    def attach_loss(cls, att) -> Tensor | None:
        """One balance loss over the tokens of every block of the attach (pooled), × ``aux_coef``."""
        routers = [a for a in att.active_adapters if isinstance(a, cls) and a.router is not None]
        coef = att.method_config(None).aux_coef if routers else 0.0
        if not coef:
            return None
        loss = cls._balance([a._pooled() for a in routers])
        return None if loss is None else coef * loss
