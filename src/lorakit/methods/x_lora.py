"""X-LoRA: a mixture of LoRA experts with a learned per-token classifier (Buehler & Buehler 2024, arXiv:2402.07148).

Every adapted module ℓ (ℓ = 0..L-1 in module order) holds N LoRA experts ``A_j`` (r, d_in), ``B_j`` (d_out, r),
normally N pretrained LoRAs (:func:`xlora_from_loras`, as in the paper), frozen unless ``use_trainable_adapters``.
One classifier per model (Linear, or an MLP of depth ``xlora_depth``, width ``xlora_size``, ReLU, dropout) reads the
last hidden state ``h`` (B, T, H) of a first **scaling pass** and predicts ``λ = softmax(c(h)/T)`` of shape
(B, T, L, N) (``layerwise_scalings``; otherwise (B, T, N) broadcast to every layer). Second pass, per module::

    y = W0 x + g · Σ_j λ_{ℓ,j} · s_j · B_j A_j x        (s_j = α/r, g = global_scaling_weight)

(PEFT multiplies the input, ``B_j A_j (λ_{ℓ,j} x)``; the same for a per-token scalar.) Optional ``top_k_lora``
zeroes all but the k largest λ and ``enable_softmax_topk`` renormalises those k by a softmax. In the scaling pass
(no_grad) every λ is the constant ``scaling_pass_value`` (default 0: the base model alone), passed through the same
top-k, as PEFT. Every forward runs exactly two base passes. Trains the classifier (and the experts if
``use_trainable_adapters``). Not mergeable (the output depends on the input through λ).

Mechanism in lorakit (the generic ``Adapter.bind`` hook, no X-LoRA case in the core): ``bind`` gives the FIRST
adapter (the owner) the classifier ``xlora_classifier`` (file keys stay under that module's path; peft_type LORAKIT),
replaces the model's forward by the two passes (a hook calling forward breaks the torch.compile graph) and hooks the
output head to capture its input (= HF's ``hidden_states[-1]``); detach puts both back. Decisions: ``hidden_size``
0 = the head's input size (``_mixture.output_head``); λ (B,) from a pooled head broadcasts over (B, T) tokens;
outside a model forward (or for inputs of another shape) adapters use ``scaling_pass_value``; the last λ is kept so
gradient checkpointing recomputes with it; ``past_key_values`` is refused (generate with ``use_cache=False``, as
PEFT). Linear / Conv1D experts only (PEFT also has embedding and conv2d).
"""
from __future__ import annotations

from typing import ClassVar

import functools
import inspect
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import LayerView, register
from ..errors import ConfigError
from ._mixture import Mixture, RestoreForward, output_head, read_lora_factors, topk_mask


@register("x_lora", family="mixture of LoRA experts", paper="Buehler & Buehler 2024, X-LoRA: Mixture of Low-Rank "
          "Adapter Experts, a Flexible Framework for Large Language Models, arXiv:2402.07148")
class XLoRA(Mixture):
    __doc__ = __doc__
    full_logits = True  # bind hooks the output head's input at every position (the scaling pass)
    roles = {"experts_A": "A", "experts_B": "B", "xlora_classifier": "router"}
    example = {"r": 2, "num_experts": 3, "use_trainable_adapters": True, "xlora_depth": 2, "xlora_size": 8}

    @dataclass
    class Config:
        r: int = 8  # rank of each expert (xlora_from_loras: the largest rank of the loaded LoRAs)
        alpha: float = 16.0
        num_experts: int = 2
        dropout: float = 0.0
        hidden_size: int = 0  # classifier input; 0 = the output head's input size
        xlora_depth: int = 1
        xlora_size: int = 2048
        xlora_dropout_p: float = 0.2
        layerwise_scalings: bool = False
        enable_softmax: bool = True
        enable_softmax_topk: bool = False
        softmax_temperature: float = 1.0
        top_k_lora: int = 0  # 0 = dense
        scaling_pass_value: float = 0.0
        global_scaling_weight: float = 1.0
        use_trainable_adapters: bool = False
        positive: ClassVar = ("r", "num_experts", "xlora_depth", "xlora_size")

        def validate(self) -> None:
            if not self.softmax_temperature > 0:
                raise ConfigError(f"softmax_temperature={self.softmax_temperature} must be > 0")

    def __init__(self, base, cfg: Config, view=None):
        super().__init__(base, cfg, view, router=False)
        if not 0 <= cfg.top_k_lora <= self.E or cfg.softmax_temperature <= 0 or cfg.xlora_depth < 1:
            raise ConfigError(f"X-LoRA needs 0 <= top_k_lora <= num_experts, softmax_temperature > 0 and "
                              f"xlora_depth >= 1 (got {cfg.top_k_lora}, {cfg.softmax_temperature}, {cfg.xlora_depth})")
        self.frozen = () if cfg.use_trainable_adapters else ("experts_A", "experts_B")
        self.layer, self.n_layers, self._owner = 0, 1, (self,)
        self._scalings: Tensor | None = None  # owner: λ (*lead, L, N) of the latest forward
        self._capture: list | None = None

    @classmethod
    def share(cls, att) -> None:
        adapters = att.adapters
        if len({a.E for a in adapters}) > 1:
            raise ConfigError("X-LoRA: num_experts must be the same for every module (one classifier)")
        for i, a in enumerate(adapters):
            a.layer, a.n_layers, a._owner = i, len(adapters), (adapters[0],)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for m in getattr(self, "xlora_classifier", ()):
            if isinstance(m, nn.Linear):
                m.reset_parameters()

    # --- the model-level two-pass forward ------------------------------------------------------------------------
    @classmethod
    def bind(cls, att) -> list:
        model, name, adapters = att.model, att.name, att.adapters
        owner, c = adapters[0], adapters[0].cfg
        head = output_head(model)
        hid = c.hidden_size or LayerView(head).d_in
        n_out = owner.E * (owner.n_layers if c.layerwise_scalings else 1)
        seed = att.config.seed
        p = owner.experts_A
        with torch.random.fork_rng(devices=[]), torch.device(p.device):
            if seed is not None:
                torch.manual_seed(seed)
            dims, layers = [hid] + [c.xlora_size] * (c.xlora_depth - 1), []
            for d0, d1 in zip(dims[:-1], dims[1:]):
                layers += [nn.Linear(d0, d1), nn.ReLU()] + ([nn.Dropout(c.xlora_dropout_p)] if c.xlora_dropout_p else [])
            owner.xlora_classifier = nn.Sequential(*layers, nn.Linear(dims[-1], n_out)).to(p.dtype)
        owner._bound = (name, att.members[0].host)
        params = inspect.signature(model.forward).parameters
        owner._pass_kwargs = {k: v for k, v in (("use_cache", False), ("logits_to_keep", 0)) if k in params}
        prior = model.__dict__.get("forward")  # the forward is replaced (not hooked): one graph under torch.compile
        fwd = functools.partial(cls._two_passes, owner, model, prior)
        model.forward = functools.update_wrapper(fwd, model.forward)  # keeps the signature for inspect
        return [RestoreForward(model, prior), head.register_forward_hook(functools.partial(cls._grab, owner))]

    @staticmethod
    def _grab(owner, _mod, args, _out) -> None:
        if owner._capture is not None:
            owner._capture.append(args[0])

    @staticmethod
    def _two_passes(owner, model, prior, *args, **kwargs):
        forward = prior if prior is not None else functools.partial(type(model).forward, model)
        name, host = owner._bound
        if name not in host.active or owner._capture is not None:
            return forward(*args, **kwargs)
        if kwargs.get("past_key_values") is not None:
            raise ConfigError("X-LoRA computes its scalings from a full pass over the input: generate with "
                              "use_cache=False (no past_key_values)")
        kw = {k: v for k, v in kwargs.items() if k != "labels"}
        kw.update(owner._pass_kwargs)
        owner._scalings, owner._capture = None, []
        try:
            with torch.no_grad():
                forward(*args, **kw)  # pass 1: λ = scaling_pass_value everywhere
            h = owner._capture[0]
        finally:
            owner._capture = None
        owner._scalings = owner.classify(h)
        return forward(*args, **kwargs)  # pass 2 with the predicted λ

    def classify(self, h: Tensor) -> Tensor:
        """λ (*lead, L, N) from the last hidden state h (*lead, H)."""
        c = self.cfg
        logits = self.xlora_classifier(h.to(self.experts_A.dtype))
        if c.layerwise_scalings:
            logits = logits.unflatten(-1, (self.n_layers, self.E))
        else:
            logits = logits.unsqueeze(-2).expand(*logits.shape[:-1], self.n_layers, self.E)
        return torch.softmax(logits / c.softmax_temperature, dim=-1) if c.enable_softmax else logits

    # --- per module ----------------------------------------------------------------------------------------------
    def layer_scalings(self, lead: torch.Size) -> Tensor:
        """λ_ℓ broadcastable to (*lead, N), after top-k / softmax-over-top-k."""
        c, lam = self.cfg, self._owner[0]._scalings
        k = lam.dim() - 2 if lam is not None else 0
        if lam is None or tuple(lam.shape[:k]) != tuple(lead[:k]) or k > len(lead):
            w = torch.full((*lead, self.E), c.scaling_pass_value, device=self.experts_A.device)
        else:
            w = lam[..., self.layer, :].reshape(*lam.shape[:k], *([1] * (len(lead) - k)), self.E)
        if c.top_k_lora:
            w = w * topk_mask(w, c.top_k_lora)
        if c.enable_softmax_topk:
            nz = w != 0
            w = torch.softmax(w.masked_fill(~nz, -math.inf), dim=-1).masked_fill(~nz, 0.0)
        return w

    def delta(self, x: Tensor) -> Tensor:
        x = self.cast_in(x)
        w = self.layer_scalings(x.shape[:-1])
        self.record(w / w.sum(-1, keepdim=True).clamp_min(1e-12), w.expand(*x.shape[:-1], self.E))
        return self.mix(self.dropout(x), w) * self.cfg.global_scaling_weight


def latest_scalings(model: nn.Module, name: str = "default") -> Tensor | None:
    """λ (B, T, L, N) of the latest forward of X-LoRA adapter ``name`` (PEFT's ``get_latest_scalings``)."""
    from ..attachments import attachments

    att = attachments(model).get(name)
    owner = next((a for a in att.adapters if isinstance(a, XLoRA)), None) if att is not None else None
    return None if owner is None else owner._scalings


@torch.no_grad()
def xlora_from_loras(model: nn.Module, directories: list, name: str = "default", **options) -> nn.Module:
    """Attach X-LoRA ``name`` with the LoRA adapters in ``directories`` as its experts (expert i <- directories[i]),
    as in the paper. Each LoRA's scale α_i/r_i is folded into its B; ranks may differ (zero-padded to the largest)
    and so may targets (the union is adapted; an expert absent from a module contributes zero there)."""
    from ..attachments import get_attachment
    from ..inject import attach

    experts = [read_lora_factors(d) for d in directories]
    paths = sorted({p for f in experts for p in f})
    r = max(A.shape[0] for f in experts for A, _ in f.values())
    attach(model, {**options, "method": "x_lora", "targets": paths, "r": r, "alpha": float(r),
                   "num_experts": len(experts)}, name)
    for path, a in ((m.path, m.adapter) for m in get_attachment(model, name).members):
        a.experts_A.zero_(), a.experts_B.zero_()
        for i, f in enumerate(experts):
            if path in f:
                A, B = f[path]
                a.experts_A[i, : A.shape[0]] = A.to(a.experts_A.dtype)
                a.experts_B[i, :, : B.shape[1]] = B.to(a.experts_B.dtype)
    return model
