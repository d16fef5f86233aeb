"""SaRA: train the small-magnitude ("ineffective") weights of the base, with a nuclear-norm low-rank penalty
(Hu et al. 2024, SaRA: High-Efficient Diffusion Model Fine-tuning with Progressive Sparse Low-Rank Adaptation,
arXiv:2409.06633; official code sjtuplayer/SaRA ``optim/adamw.py``).

Mask ``M = |W0| < θ`` (``threshold``), elementwise on each targeted matrix. The trained weight is
``W' = W0 ⊙ (1 − M) + scatter_M(P)`` with ``P`` (|M|,) initialised to ``W0[M]``; everything outside ``M`` stays frozen.
lorakit stores the change ``ΔW = scatter_M(P − W0[M])`` as a :class:`~lorakit.methods._sparse.SparseDelta`
(trainable ``sparse_values = P − W0[M]``, init 0, so attaching changes nothing), which is the same function and the
same gradients; the file holds indices + values + shape, and ``merge(W) = W + ΔW`` is exact.

Low-rank constraint (as the official optimiser does it): at each training step ONE targeted matrix is drawn at random
(from those with ``min(d_out, d_in) > 64``, the official ``low_rank_ids``; all targets when none is that large) and
``λ · ‖W' ⊙ M‖_*`` (``lambda_rank``; the nuclear norm of the trainable entries of the current weight) is added to the
loss through ``attach_loss``. The draw uses torch's global RNG, so a resumed run (RNG restored) draws the same layers.

Memory ("unstructural backprop"): only the ``|M|`` values exist as parameters. The forward is a custom autograd
product that saves the layer input and the index set only: it rebuilds the dense ``ΔW`` transiently in the forward,
and in the backward the dense ``∂L/∂ΔW = gᵀx`` transiently and gathers its ``M`` entries (the official ``Sparse``
function likewise returns ``grad[mask]`` of the dense weight gradient); no dense tensor lives from a layer's forward
to its backward, so the activation memory is that of the frozen model.

Progressive mode (``progressive_iter`` = p > 0, official ``progressive_iter``, README 2500 for SD 1.5; 0 = off):
:class:`SaRAProgressive`, the method's controller. As the official optimiser, at the (p+1)-th optimiser step the mask
is recomputed with θ on the current weights, ``M' = |W0 + ΔW| < θ``, the trainable values become those entries'
current values (the change so far is kept), the optimiser state restarts (the official code re-runs
``Optimizer.__init__``: empty state, step counts from 0) and that step's update is skipped (the official ``step``
returns before updating; here the controller drops the gradients before ``optimizer.step()``). Entries of the old
mask outside ``M'`` keep their change and stop training (``frozen_indices`` / ``frozen_values``). Entries outside
the first mask never change: they hold ``|W0| ≥ θ`` and are unchanged, so ``M' ⊆ M``. The count of trainable values
shrinks: the Parameter is resized in place (:mod:`lorakit.methods._sparse`), and a checkpoint holds the new support,
so ``--resume`` after the re-selection is exact.

Choices where the official code differs or is unclear:

* The official penalty is back-propagated into the frozen source tensor rather than into ``P`` (its ``rank_loss``
  reaches ``P`` only through the in-place copy), so in that code it may not move ``P`` at all; we take the paper's
  formula at its word and let the penalty's gradient reach the trainable entries.
* Weight decay: the official AdamW decays ``P`` (absolute values) toward 0. lorakit's default AdamW groups give no
  weight decay to vectors, and ``sparse_values`` is one; a procedure that decays it decays ``P − W0[M]`` toward 0,
  i.e. toward ``W0[M]`` (the entries are below θ, 2e-3, so the difference per step is ``lr·wd·θ`` ≈ 1e-8).
* The official code writes ``|P|`` (not ``P``) into the weight when it builds the mask, at init and at the progressive
  re-selection (``Sparse.apply(param, trainable_params[i].abs(), mask)``), so the one forward that follows sees the
  masked entries with their signs dropped, until the next update writes ``P`` back. We read that as an artifact
  (the entries are below θ) and keep ``P``. The run's LR schedule continues across the re-selection.
* Default lr in the paper's code is ``1e-3 · exp(−350 θ)`` (recipe). Embeddings, norms and biases are not targeted
  here (targets are linear layers).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..controllers import Controller
from ..core import register
from ..errors import ConfigError
from ._sparse import SparseDelta, forget_state


@register("sara", family="sparse",
          paper="Hu et al. 2024, SaRA: High-Efficient Diffusion Model Fine-tuning with Progressive Sparse Low-Rank "
                "Adaptation, arXiv:2409.06633")
class SaRA(SparseDelta):
    __doc__ = __doc__
    example = {"threshold": 0.05, "lambda_rank": 1e-3}
    fsdp_unsupported = ("its update reads the base weight outside the layer's own forward (the |W0| < θ support and "
                        "the nuclear-norm term), which FSDP2 holds as a shard")
    budget_exempt = ("its trainable set is every base entry below the magnitude threshold (data-dependent, fixed by "
                     "the base weights), not a size knob")

    @dataclass
    class Config:
        threshold: float = 2e-3  # θ: entries with |W0| < θ train
        lambda_rank: float = 5e-4  # λ of the nuclear-norm penalty on one random layer per step (0: off)
        progressive_iter: int = 0  # > 0: re-select the mask on the current weights at that step (0: off)

        def validate(self) -> None:
            if self.progressive_iter < 0:
                raise ConfigError(f"sara: progressive_iter must be >= 0 (0: off), got {self.progressive_iter}")
            if self.threshold <= 0:
                raise ConfigError(f"sara: threshold must be > 0, got {self.threshold}")
            if self.lambda_rank < 0:
                raise ConfigError(f"sara: lambda_rank must be >= 0, got {self.lambda_rank}")

    @torch.no_grad()
    def init_from(self, weight: Tensor, stats=None) -> None:
        idx = (weight.abs() < self.cfg.threshold).reshape(-1).nonzero().squeeze(1)
        self.set_support(idx)
        return None

    def masked_weight(self) -> Tensor:
        """``W' ⊙ M`` as a (d_out, d_in) matrix: the trainable entries of the current weight, zero elsewhere."""
        w0 = self.base_matrix().reshape(-1)
        v = self.sparse_values
        p = w0[self.sparse_indices].to(v.dtype) + v
        flat = torch.zeros(w0.numel(), dtype=v.dtype, device=v.device).scatter(0, self.sparse_indices, p)
        return flat.view(self.view.d_out, self.view.d_in)

    def nuclear_norm(self) -> Tensor:
        return torch.linalg.svdvals(self.masked_weight().float()).sum()

    @classmethod
    def attach_loss(cls, att) -> Tensor | None:
        if not torch.is_grad_enabled():
            return None
        ads = [a for a in att.active_adapters if a.cfg.lambda_rank > 0 and a.sparse_values.numel()
               and a.sparse_values.requires_grad]
        if not ads:
            return None
        big = [a for a in ads if min(a.view.d_out, a.view.d_in) > 64] or ads
        a = big[int(torch.randint(len(big), ()))]
        return a.cfg.lambda_rank * a.nuclear_norm()

    @torch.no_grad()
    def reselect(self) -> None:
        """Progressive re-selection: ``M' = |W0 + ΔW| < θ`` on the current weights; the values of ``M'`` keep their
        change and train on, the rest of the change is kept frozen (see the class doc)."""
        w0 = self.base_matrix().reshape(-1).float()
        idx, val = self.element_support()
        delta = torch.zeros_like(w0).index_copy_(0, idx, val.float())
        keep = (w0 + delta).abs() < self.cfg.threshold
        new = keep.nonzero().squeeze(1)
        drop = idx[~keep[idx]]
        self.set_support(new, delta[new], frozen=(drop, delta[drop]))

    @classmethod
    def controller(cls, att) -> "SaRAProgressive | None":
        if not any(m.adapter.cfg.progressive_iter for m in att.members if isinstance(m.adapter, SaRA)):
            return None
        return SaRAProgressive(att)


class SaRAProgressive(Controller):
    """SaRA's progressive mode: at step index ``progressive_iter`` (after that many updates), before the optimiser
    step, every adapter re-selects its mask (:meth:`SaRA.reselect`), its optimiser state is dropped and its gradients
    too (so that step makes no update to it, as the official optimiser). Stateless: the supports are adapter tensors
    (a checkpoint restores them) and the step index says whether the re-selection has happened."""

    def __init__(self, att):
        self.att = att

    def on_train_begin(self, model, optimizer, total_steps: int) -> None:
        its = {a.cfg.progressive_iter for a in self.att.of_type(SaRA)} - {0}
        if its and max(its) >= total_steps:
            raise ConfigError(f"sara: progressive_iter={max(its)} is not before the end of the run ({total_steps} "
                              "steps), so the mask would never be re-selected; lower it or set 0 (off)")

    def before_step(self, step: int, model, optimizer) -> None:
        for a in self.att.of_type(SaRA):
            if a.cfg.progressive_iter and step == a.cfg.progressive_iter:
                a.reselect()
                forget_state(optimizer, [a.sparse_values])
