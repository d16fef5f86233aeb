"""``optim.name=loraplus``: LoRA+ (Hayou, Ghosh, Yu 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models",
arXiv:2402.12354).

ΔW = s·B·A with A (r, d_in) and B (d_out, r). For wide layers, one learning rate for both factors is inefficient:
feature learning needs ``lr_B / lr_A = λ ≫ 1``. LoRA+ trains A at ``η = optim.lr`` and B at ``λ·η`` (``ratio``,
the paper's suggested λ = 2⁴ = 16). Everything else is AdamW as ``optim.name=adamw``.

Which parameters take which rate (by declared role, never by name):

* role ``A`` and the rank-space roles (core, singular_values, gate, scale, router, other): ``η``;
* roles in ``fast_roles`` (default ``B``, ``magnitude``, ``bias``): ``λ·η``. The paper only speaks of A and B; PEFT
  (``create_loraplus_optimizer``) puts every 1-D parameter in the B group, i.e. DoRA's magnitude and trained biases.
  We follow it for those two (output-side vectors, the B side in the paper's width-scaling argument) and keep
  rank-space vectors (SoRA's gate, singular values) at η, where the argument says nothing;
* role ``head`` (``adapter.trainable`` copies): ``optim.trainable_lr`` as with adamw (PEFT would give a head's
  bias λ·η and its weight η: a new classifier head is not a LoRA factor);
* adapters on embedding layers: like every other layer unless ``embedding_lr`` is set; then all their parameters
  take that fixed rate (PEFT's ``loraplus_lr_embedding``, default 1e-6 there). We do not copy PEFT's default: a
  fixed 1e-6 ignores ``optim.lr`` and, with a one-hot input, the width argument behind λ does not single embeddings
  out for a tiny rate.

A role with settings of its own (a method's declared ``role_optim`` such as MHR's routing logits, or
``optim.role_optim``) takes them here too, as with adamw: the authors' rate for that role beats the λ rule.

Weight decay follows adamw (``optim.weight_decay`` on 2-D and larger, none on vectors), so ``ratio=1`` reproduces
``optim.name=adamw`` bit for bit (tested). The check refuses methods with no trainable A and B (VeRA, LoRA-XS, ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from .base import ROLES, Procedure, TrainParam, register_procedure, role_settings

__all__ = ["LoRAPlus"]


@register_procedure("loraplus")
class LoRAPlus(Procedure):
    paper = "Hayou, Ghosh, Yu 2024, arXiv:2402.12354"
    @dataclass
    class Config:
        ratio: float = 16.0  # λ = lr_B / lr_A (the paper's suggestion 2^4)
        embedding_lr: float | None = None  # fixed rate for adapters on embedding layers (PEFT: 1e-6); None: as others
        fast_roles: list[str] = field(default_factory=lambda: ["B", "magnitude", "bias"])  # trained at ratio * lr

    def validate(self) -> None:
        c = self.cfg
        if not c.ratio > 0:
            raise ConfigError(f"loraplus: ratio={c.ratio} must be > 0 (LoRA+'s lr_B / lr_A; the paper suggests 16)")
        if c.embedding_lr is not None and c.embedding_lr < 0:
            raise ConfigError(f"loraplus: embedding_lr={c.embedding_lr} must be >= 0 (or null: as other layers)")
        bad = [r for r in c.fast_roles if r not in ROLES or r in ("A", "head")]
        if bad:
            raise ConfigError(f"loraplus: fast_roles: {bad[0]!r} cannot take the B rate; valid roles: "
                              f"{', '.join(r for r in ROLES if r not in ('A', 'head'))}")

    def check(self, params: list[TrainParam]) -> None:
        roles = {t.role for t in params}
        if not {"A", "B"} <= roles:
            missing = " or ".join(r for r in ("A", "B") if r not in roles)
            self.refuse(f"LoRA+ trains the factors A and B at rates lr and {self.cfg.ratio:g}*lr, but no trainable "
                        f"parameter has role {missing}", params)

    def rate(self, t: TrainParam) -> tuple[str, float]:
        """(group name, learning rate) of one parameter."""
        hp, c = self.hp, self.cfg
        if t.role == "head":
            return "head", hp.head_lr
        if c.embedding_lr is not None and t.kind == "embedding":
            return "embedding", c.embedding_lr
        if t.role in c.fast_roles:
            return "fast", hp.lr * c.ratio
        return "base", hp.lr

    def param_groups(self, params: list[TrainParam]) -> list[dict]:
        wd = self.hp.weight_decay
        groups: dict[str, dict] = {}
        for name in ("base", "fast", "embedding", "head"):
            for decay in (True, False):
                key = name if decay else f"{name}_no_decay"
                groups[key] = {"name": key, "params": [], "weight_decay": wd if decay else 0.0, "lr": None}
        own = [(t, role_settings(t, self.hp)) for t in params]
        for t in (t for t, st in own if not st):
            name, lr = self.rate(t)
            decay = name == "head" or t.param.ndim >= 2  # as adamw: heads always decay, vectors never elsewhere
            g = groups[name if decay else f"{name}_no_decay"]
            g["params"].append(t.param)
            g["lr"] = lr
        out = list(groups.values()) + self.role_groups([(t, st) for t, st in own if st])
        return [g for g in out if g["params"]]
