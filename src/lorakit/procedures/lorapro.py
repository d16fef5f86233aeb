"""``optim.name=lorapro``: LoRA-Pro (Wang, Liang, He, Wang, Tan 2025, "LoRA-Pro: Are Low-Rank Adapters Properly
Optimized?", ICLR 2025, arXiv:2407.18242; official code github.com/mrflogs/LoRA-Pro, a patched DeepSpeed 0.15.1,
``stage_1_and_2.py::lorapro_full_adjustment``).

One LoRA step with factor gradients ``(g_A, g_B)`` changes ``W`` (to first order) by the *equivalent gradient*
``g̃ = s·B·g_A + s·g_B·A`` (A: (r, d_in), B: (d_out, r), s the method's scale). LoRA's own gradients are
``g_A^lora = s·Bᵀ G`` and ``g_B^lora = s·G Aᵀ`` (G = ∂L/∂W). LoRA-Pro replaces them by the pair minimising
``‖g̃ − G‖_F``; with only the LoRA gradients known, the closed form is (for any r×r matrix X)::

    g_A = (1/s²)(BᵀB)⁻¹ g_A^lora + X A
    g_B = (1/s²)[I − B(BᵀB)⁻¹Bᵀ] g_B^lora (AAᵀ)⁻¹ − B X

and ``g̃ = P_B G + (I − P_B) G P_A`` (the projection of G onto the tangent space of the rank-r matrices at BA; it
does not depend on X). X is the solution of the Sylvester equation ``(BᵀB) X + X (AAᵀ) = −(1/s²)(BᵀB)⁻¹ g_A^lora Aᵀ``,
the optimal pair closest to the plain LoRA gradients. Inverses are ``pinv(M + δI)``, δ = 1e-8 (official).

**Adam variant** (``adam: true``, the official code): the Adam moments are kept for the *full* (d_out, d_in)
equivalent gradient of each layer (so the optimiser state is that of full fine-tuning for the adapted matrices):
``g̃`` (X = 0) updates ``m, v``; ``u = m̂/(√v̂ + ε)`` is mapped back to factor gradients ``s·Bᵀu``, ``s·u Aᵀ``; these
are adjusted again (with the Sylvester X) and the factors take a plain SGD step with them. ``adam: false`` is the
paper's SGD form (adjusted gradients, SGD step).

Choices, and why:

* **Full gradient for the logged error: taken with a hook, not recovered.** G cannot be recovered from
  ``(g_A, g_B)`` (they are only its projections ``BᵀG`` and ``GAᵀ``). Every ``log_every`` steps, hooks on the paired
  adapters keep the layer input ``x`` and, in backward, accumulate ``G = Σ_tokens (∂L/∂y) xᵀ`` from the gradient of
  the layer output (the frozen base weights never get a gradient, so clipping and memory are untouched); then
  ``procedure/equiv_grad_error`` = sqrt(Σ_layers ‖G − g̃‖²_F) with ``g̃`` the LoRA-Pro equivalent gradient of that
  G, ``procedure/equiv_grad_rel_error`` (over ‖G‖) and, for comparison, ``procedure/lora_grad_rel_error`` (plain
  LoRA's ``g̃ = s²(BBᵀG + GAᵀA)``) are logged. Linear and Conv1D layers only (other kinds are skipped);
  ``log_every: 0`` switches it off (no extra cost).
* **The scale comes from the adapter** (``lowrank().scale``; the official code hard-codes 16/8).
* **Sylvester solve by two symmetric eigendecompositions** (BᵀB = UΛUᵀ, AAᵀ = VMVᵀ, X = U[(UᵀCV)/(λ_i+μ_j)]Vᵀ):
  the same unique solution as the official general ``eig`` solve, but real and stable for these PSD matrices.
* **Step 0** (B = 0): the official special case (``g_A`` unchanged, ``g_B = (1/s²)g_B^lora(AAᵀ)⁻¹``) equals the
  general formula there (``g_A^lora = 0`` when B = 0), so no branch.
* **Weight decay** on the factors is decoupled (``θ ← θ − lr·wd·θ``, as AdamW); the official run uses SGD without
  decay. Every other trainable parameter (heads, biases, other roles) trains with AdamW in the same optimiser.
* **β1, β2, ε** come from ``optim.betas/eps`` (official: 0.9/0.999/1e-8 hard-coded).
* **Refused**: methods whose adapters are not exactly ``ΔW = s·B·A`` with one trainable A and B (VeRA, DoRA's
  magnitude, expert-stacked factors, ...): the check asks each adapter for ``lowrank()`` and its parameters.

Exact resume: the moments and step counts live in the optimiser's state (checkpointed with it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import Procedure, TrainParam, register_procedure

__all__ = ["LoRAPro", "LoRAProOptimizer", "lorapro_adjust", "solve_sylvester"]

DELTA = 1e-8


def _pinv(M: Tensor) -> Tensor:
    return torch.linalg.pinv(M + DELTA * torch.eye(M.shape[0], dtype=M.dtype, device=M.device))


def solve_sylvester(P: Tensor, Q: Tensor, C: Tensor) -> Tensor:
    """X with ``P X + X Q = C`` for symmetric positive semi-definite P (r×r) and Q (r×r)."""
    lam, U = torch.linalg.eigh(P)
    mu, V = torch.linalg.eigh(Q)
    den = (lam[:, None] + mu[None, :]).clamp_min(DELTA)
    return U @ ((U.T @ C @ V) / den) @ V.T


def lorapro_adjust(A: Tensor, B: Tensor, gA: Tensor, gB: Tensor, s: float, sylvester: bool = True
                   ) -> tuple[Tensor, Tensor]:
    """LoRA-Pro's adjusted factor gradients from the LoRA gradients ``gA = s·BᵀG``, ``gB = s·G Aᵀ`` (fp32)."""
    BtB_inv, AAt_inv = _pinv(B.T @ B), _pinv(A @ A.T)
    ga = BtB_inv @ gA / s ** 2
    gb = (gB - B @ (BtB_inv @ (B.T @ gB))) @ AAt_inv / s ** 2
    if sylvester:
        X = solve_sylvester(B.T @ B, A @ A.T, -(BtB_inv @ gA @ A.T) / s ** 2)
        ga = ga + X @ A
        gb = gb - B @ X
    return ga, gb


class LoRAProOptimizer(torch.optim.Optimizer):
    """The LoRA-Pro optimiser: groups with ``pairs`` (lists of ``(A, B, scale)``) update their factors by LoRA-Pro
    (Adam moments of the full equivalent gradient when ``adam``, then an SGD step with the adjusted gradients);
    the other groups are AdamW. ``optimizer.state`` holds everything (exact resume through its state_dict)."""

    def __init__(self, groups: list[dict], lr: float, betas=(0.9, 0.999), eps: float = 1e-8, adam: bool = True,
                 sylvester: bool = True):
        super().__init__(groups, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=0.0, pairs=None))
        self.adam, self.sylvester = adam, sylvester

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            if g["pairs"]:
                self._lorapro(g)
            else:
                self._adamw(g)
        return loss

    def _lorapro(self, g: dict) -> None:
        lr, wd, (b1, b2), eps = g["lr"], g["weight_decay"], g["betas"], g["eps"]
        for pA, pB, s in g["pairs"]:
            if pA.grad is None or pB.grad is None:
                continue
            A, B = pA.detach().float().reshape(pA.shape[0], -1), pB.detach().float().reshape(pB.shape[0], -1)
            gA, gB = pA.grad.float().reshape(A.shape), pB.grad.float().reshape(B.shape)
            if self.adam:
                ga, gb = lorapro_adjust(A, B, gA, gB, s, sylvester=False)
                equiv = s * (B @ ga) + s * (gb @ A)
                st = self.state[pA]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(equiv)
                    st["exp_avg_sq"] = torch.zeros_like(equiv)
                st["step"] += 1
                t = float(st["step"])
                st["exp_avg"].lerp_(equiv, 1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(equiv, equiv, value=1 - b2)
                denom = (st["exp_avg_sq"].sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
                u = (st["exp_avg"] / (1 - b1 ** t)) / denom
                gA, gB = s * (B.T @ u), s * (u @ A.T)
            ga, gb = lorapro_adjust(A, B, gA, gB, s, sylvester=self.sylvester)
            for p, d in ((pA, ga), (pB, gb)):
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(d.reshape(p.shape).to(p.dtype), alpha=-lr)

    def _adamw(self, g: dict) -> None:
        lr, wd, (b1, b2), eps = g["lr"], g["weight_decay"], g["betas"], g["eps"]
        for p in g["params"]:
            if p.grad is None:
                continue
            st = self.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["step"] += 1
            t = float(st["step"])
            p.mul_(1 - lr * wd)
            st["exp_avg"].lerp_(p.grad, 1 - b1)
            st["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (st["exp_avg_sq"].sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
            p.addcdiv_(st["exp_avg"], denom, value=-lr / (1 - b1 ** t))

    def state_dict(self):
        sd = super().state_dict()
        for g in sd["param_groups"]:
            g.pop("pairs", None)  # tensors' identities, not data: rebuilt by the procedure
        return sd

    def load_state_dict(self, state_dict):
        pairs = [g["pairs"] for g in self.param_groups]
        super().load_state_dict(state_dict)
        for g, p in zip(self.param_groups, pairs):
            g["pairs"] = p


def _is(x: Tensor, p: Tensor) -> bool:
    """``x`` is the parameter ``p`` or a view of it (LoRA's ``A`` is ``lora_A.weight.flatten(1)``)."""
    return x is p or (getattr(x, "_base", None) is p and x.numel() == p.numel())


def _pairs(params: list[TrainParam]) -> tuple[list[tuple[TrainParam, TrainParam, float]], list[str]]:
    """(A, B, scale) per adapter whose trainable A and B are exactly its ``lowrank()`` factors; problems found."""
    by: dict[int, dict[str, list[TrainParam]]] = {}
    for t in params:
        if t.adapter is not None and t.role in ("A", "B"):
            by.setdefault(id(t.adapter), {}).setdefault(t.role, []).append(t)
    out, bad = [], []
    for roles in by.values():
        a, b = roles.get("A", []), roles.get("B", [])
        t0 = (a or b)[0]
        if len(a) != 1 or len(b) != 1:
            bad.append(f"'{t0.method}' ({t0.path or t0.local}) has {len(a)} trainable A and {len(b)} trainable B")
            continue
        try:
            lr = t0.adapter.lowrank()
        except Exception as e:  # noqa: BLE001 - e.g. expert-stacked factors
            lr, why = None, str(e)
        else:
            why = "its lowrank() is None"
        if lr is not None and lr.magnitude is not None:
            why = "ΔW has a magnitude, not s·B·A"
        elif lr is not None and not (_is(lr.A, a[0].param) and _is(lr.B, b[0].param)):
            lr, why = None, "its low-rank factors are not its trainable A and B themselves"
        if lr is None or lr.magnitude is not None:
            bad.append(f"'{t0.method}' is not ΔW = s·B·A over its trainable A and B ({why})")
            continue
        out.append((a[0], b[0], float(lr.scale)))
    return out, bad


@register_procedure("lorapro")
class LoRAPro(Procedure):
    paper = "Wang et al. 2025, ICLR, arXiv:2407.18242"
    family = "optimiser"

    @dataclass
    class Config:
        adam: bool = True  # full-space Adam moments of the equivalent gradient (official); false: SGD form
        sylvester: bool = True  # the optimal X (Sylvester); false: X = 0 (same g̃, not the closest to LoRA's)
        log_every: int = 10  # log the equivalent-gradient error every N steps (needs G: one base-weight gradient)

    def __init__(self, cfg=None, hp=None):
        super().__init__(cfg, hp)
        self._pairs: list[tuple[TrainParam, TrainParam, float]] = []
        self._metrics: dict[str, float] = {}
        self._watch: list = []

    def check(self, params: list[TrainParam]) -> None:
        pairs, bad = _pairs(params)
        if bad or not pairs:
            self.refuse("LoRA-Pro adjusts the gradients of pairs ΔW = s·B·A" +
                        (f", but {bad[0]}" if bad else ", but no adapter trains both A and B"), params)

    def build_optimizer(self, params: list[TrainParam]) -> torch.optim.Optimizer:
        hp = self.hp
        self._pairs, _ = _pairs(params)
        in_pair = {id(t.param) for a, b, _ in self._pairs for t in (a, b)}
        groups = [{"name": "lorapro", "params": [t.param for a, b, _ in self._pairs for t in (a, b)],
                   "pairs": [(a.param, b.param, s) for a, b, s in self._pairs], "weight_decay": hp.weight_decay}]
        rest = [t for t in params if id(t.param) not in in_pair]
        groups += [dict(g, pairs=None) for g in super().param_groups(rest)] if rest else []
        return LoRAProOptimizer(groups, lr=hp.lr, betas=hp.betas, eps=hp.eps, adam=self.cfg.adam,
                                sylvester=self.cfg.sylvester)

    def validate(self) -> None:
        if self.cfg.log_every < 0:
            raise ConfigError(f"lorapro: log_every={self.cfg.log_every} must be >= 0 (0: no error logging)")

    # --- the logged approximation error (needs the full gradient G of each adapted base weight) ---------------------
    def before_forward(self, step, model, optimizer) -> None:
        self._metrics = {}
        n = self.cfg.log_every
        if not n or step % n:
            return
        self._remove_watch()
        for a, b, s in self._pairs:
            if a.kind not in ("linear", "conv1d"):
                continue
            acc = {"G": None}

            def fwd(mod, args, out, acc=acc):
                x = args[0].detach()
                if out.requires_grad:
                    def back(g, x=x):
                        d_out, d_in = g.shape[-1], x.shape[-1]
                        G = g.detach().reshape(-1, d_out).float().T @ x.reshape(-1, d_in).float()
                        acc["G"] = G if acc["G"] is None else acc["G"] + G
                    out.register_hook(back)

            self._watch.append((a, s, acc, a.adapter.register_forward_hook(fwd)))

    def _remove_watch(self) -> None:
        for *_, h in self._watch:
            h.remove()
        self._watch = []

    @torch.no_grad()
    def before_step(self, step, model, optimizer) -> None:
        if not self._watch:
            return
        err = full = lora = 0.0
        for a, s, acc, _ in self._watch:
            G = acc["G"]
            if G is None:
                continue
            lr = a.adapter.lowrank()
            A, B = lr.A.detach().float(), lr.B.detach().float()
            ga, gb = lorapro_adjust(A, B, s * (B.T @ G), s * (G @ A.T), s, self.cfg.sylvester)
            err += float((G - s * (B @ ga) - s * (gb @ A)).pow(2).sum())
            lora += float((G - s * s * (B @ (B.T @ G)) - s * s * (G @ (A.T @ A))).pow(2).sum())
            full += float(G.pow(2).sum())
        self._remove_watch()
        if full > 0:
            self._metrics = {"equiv_grad_error": math.sqrt(err), "equiv_grad_rel_error": math.sqrt(err / full),
                             "lora_grad_rel_error": math.sqrt(lora / full)}

    def step_metrics(self) -> dict[str, float]:
        return dict(self._metrics)
