"""S2FT: Structured Sparse Fine-Tuning (Yang et al. 2024, S2FT: Efficient, Scalable and Generalizable LLM
Fine-tuning by Structured Sparsity, NeurIPS 2024, arXiv:2412.06289; official code Infini-AI-Lab/S2FT ``s2.py``).

Selection: in each targeted FFN output projection (``down_proj``, ``(d_out, d_ffn)``) ``n = max(1, round(ratio ·
d_ffn))`` intermediate channels ``S`` are chosen at random (seeded by the attach's ``seed``; the released scripts
select at random by ratio). **Co-permutation**: with ``π = [S (ascending), rest (ascending)]`` the rows of the
modules that produce those channels and the columns of the target are permuted by ``π`` (``couple``: a target path
suffix -> the producers' suffixes in its place: ``down_proj`` -> ``gate_proj``, ``up_proj``; BERT's
``output.dense`` -> ``intermediate.dense``). The block's function is unchanged (the activation and the gate product act
channel-wise), and the selected channels become the contiguous first ``n``, so the trainable part is a dense block:

``ΔW_π[:, :n] = s2`` (``s2``: (d_out, n), init 0),   ``y = W_π x_π + s2 · x_π[..., :n]``

(the official ``S2RowLinear``; ``x_π[..., :n]`` is a slice, not a gather). In the original coordinates
``ΔW[:, S] = s2``.

Undoing the permutation: files hold ``s2`` and the ORIGINAL channel ids ``S`` (``s2.weight``, ``s2.channels``), so
they are permutation-free; ``detach`` and ``merge_and_unload`` apply ``π⁻¹`` to every permuted weight (the merged
target included: ``W + ΔW`` in the original order). Permutation is pure indexing, so detach is bit-exact.

Choices: only the FFN-channel unit is implemented (the official default ratios train ``down_proj`` only:
``d_ratio = 0.03``, v/o/u ratios 0); attention heads (v/o co-permutation, which under grouped-query attention also
has to move q/k head groups) are not. Selection is per target matrix (the same share in every layer) rather than
over all layers' channels at once. A producer may not carry another adapter (its rows move under it); the target's
other adapters of the same model are refused the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import Adapter, Adapted, param_owner, register
from ..errors import AdapterFileError, ConfigError, TargetError


def _default_couple() -> dict[str, list[str]]:
    # Llama/Mistral/Qwen/SmolLM2, OPT/Phi, BERT/MiniLM (layer.N.output.dense <- layer.N.intermediate.dense), GPT-NeoX
    return {"down_proj": ["gate_proj", "up_proj"], "fc2": ["fc1"], "output.dense": ["intermediate.dense"],
            "dense_4h_to_h": ["dense_h_to_4h"]}


def _linear(m: nn.Module) -> nn.Linear:
    m = param_owner(m)
    if not isinstance(m, nn.Linear):
        raise TargetError(f"s2ft co-permutes nn.Linear producers; got {type(m).__name__}")
    return m


class _Permutation:
    """Handle returned by ``bind``: ``remove()`` puts the original channel order back."""

    def __init__(self, adapters: list["S2FT"]):
        self.adapters = adapters

    def remove(self) -> None:
        for a in self.adapters:
            h = a._host[0] if a._host else None
            if h is not None and h.merged_names:  # detach while merged: back to the permuted unmerged weight
                h.unmerge()                          # first (after merge_and_unload there is nothing to restore)
            a.apply_permutation(None)


@register("s2ft", family="sparse",
          paper="Yang et al. 2024, S2FT: Efficient, Scalable and Generalizable LLM Fine-tuning by Structured "
                "Sparsity, NeurIPS 2024, arXiv:2412.06289")
class S2FT(Adapter):
    __doc__ = __doc__
    layers = ("linear",)
    example = {"ratio": 0.25, "targets": ["lin1", "down_proj"],
               "couple": {"lin1": ["lin0"], "down_proj": ["gate_proj", "up_proj"]}}
    exclusive = ("it co-permutes the weights of its targets and of their producers: another adapter on them would "
                 "see permuted channels")
    budget_exempt = "its share of FFN channels is a ratio (float), not a rank-like integer knob"
    peft_keys = {"linear": {"s2": "s2.weight", "s2_channels": "s2.channels"}}

    @dataclass
    class Config:
        ratio: float = 0.03  # share of each target's input channels (FFN intermediate channels) that train
        # target path suffix -> the modules (that suffix replaced) whose output rows produce the target's input channels
        couple: dict = field(default_factory=_default_couple)

        def validate(self) -> None:
            if not 0 < self.ratio <= 1:
                raise ConfigError(f"s2ft: ratio must be in (0, 1], got {self.ratio}")
            for k, v in self.couple.items():
                if not isinstance(v, list) or not all(isinstance(s, str) for s in v) or not v:
                    raise ConfigError(f"s2ft: couple.{k} must be a non-empty list of module names, got {v!r}")

    def __init__(self, base: nn.Module, cfg: Config, view=None):
        super().__init__(base, cfg, view)
        n = max(1, round(cfg.ratio * self.view.d_in))
        self.n = n
        self.s2 = nn.Parameter(torch.zeros(self.view.d_out, n))
        self.register_buffer("s2_channels", torch.arange(n))
        self._producers: tuple[nn.Linear, ...] = ()
        self._host: tuple[Adapted, ...] = ()
        self._applied: Tensor | None = None  # the permutation now applied to the weights (None: original order)
        self._channels = torch.arange(n)  # the selected channels on the CPU (the buffer may live on meta)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.s2)

    # --- the permutation -------------------------------------------------------------------------------------------
    def permutation(self, channels: Tensor | None = None) -> Tensor:
        ch = (self._channels if channels is None else channels).to(torch.int64).cpu()
        rest = torch.ones(self.view.d_in, dtype=torch.bool)
        rest[ch] = False
        return torch.cat([ch.sort().values, rest.nonzero().squeeze(1)])

    @torch.no_grad()
    def apply_permutation(self, perm: Tensor | None) -> None:
        """Bring the target's columns and the producers' rows into order ``perm`` (None: the original order)."""
        cur = self._applied
        if cur is None and perm is None:
            return
        # new order relative to the current one: current[k] holds original channel cur[k]
        inv_cur = torch.empty_like(cur) if cur is not None else None
        if cur is not None:
            inv_cur[cur] = torch.arange(cur.numel())
        tgt = perm if perm is not None else torch.arange(self.view.d_in)
        rel = inv_cur[tgt] if inv_cur is not None else tgt  # positions in the current layout, in the new order
        w = self.base.weight
        w.copy_(w[:, rel.to(w.device)])
        for p in self._producers:
            p.weight.copy_(p.weight[rel.to(p.weight.device)])
            if p.bias is not None:
                p.bias.copy_(p.bias[rel.to(p.bias.device)])
        self._applied = perm

    # --- compute (in the permuted coordinates of the current weights) ----------------------------------------------
    def delta(self, x: Tensor) -> Tensor:
        return F.linear(self.cast_in(x)[..., : self.n], self.s2)

    def delta_weight(self) -> Tensor:
        d = torch.zeros(self.view.d_out, self.view.d_in, dtype=torch.float32, device=self.s2.device)
        d[:, : self.n] = self.s2.float()
        return d

    def original_delta(self) -> Tensor:
        """``ΔW`` in the original channel order (``ΔW[:, S] = s2``)."""
        d = torch.zeros(self.view.d_out, self.view.d_in, dtype=torch.float32, device=self.s2.device)
        d[:, self._channels] = self.s2.float()
        return d

    # --- whole attach ----------------------------------------------------------------------------------------------
    @classmethod
    def share(cls, att) -> None:
        """Pick each target's channels (the attach's seeded RNG) and find the producers, before anything changes."""
        for m in att.members:
            a = m.adapter
            keys = [k for k in a.cfg.couple if m.path == k or m.path.endswith("." + k)]
            if not keys:
                raise TargetError(f"s2ft: '{m.path}' has no coupled producers (couple maps a target's path suffix "
                                  f"to the modules that produce its input channels; it has {sorted(a.cfg.couple)}); "
                                  "target FFN output projections such as down_proj")
            key = max(keys, key=len)
            prefix = m.path[: len(m.path) - len(key)]
            prods = []
            for nm in a.cfg.couple[key]:
                try:
                    mod = att.model.get_submodule(prefix + nm)
                except AttributeError:
                    raise TargetError(f"s2ft: '{m.path}' couples with '{prefix + nm}', which this model does not "
                                      "have") from None
                if isinstance(mod, Adapted) and len(mod.adapters):
                    raise TargetError(f"s2ft: producer '{nm}' of '{m.path}' carries adapters "
                                      f"{sorted(mod.adapters)}; its rows would move under them")
                lin = _linear(mod)
                if lin.out_features != a.view.d_in:
                    raise TargetError(f"s2ft: producer '{nm}' has {lin.out_features} outputs, '{m.path}' "
                                      f"{a.view.d_in} inputs")
                prods.append(lin)
            if isinstance(m.host, Adapted) and len(m.host.adapters):
                raise TargetError(f"s2ft: '{m.path}' already carries adapters {sorted(m.host.adapters)}; their "
                                  "columns would move under them")
            a._producers, a._host = tuple(prods), (m.host,)
            a._channels = torch.randperm(a.view.d_in)[: a.n].sort().values
            a.s2_channels = a._channels.to(a.s2_channels.device)

    @classmethod
    def bind(cls, att) -> list:
        ads = [m.adapter for m in att.members]
        for a in ads:
            a.apply_permutation(a.permutation())
        return [_Permutation(ads)]

    # --- file ------------------------------------------------------------------------------------------------------
    def fit_file(self, tensors: dict[str, Tensor], where: str) -> None:
        ch = tensors.get("s2.channels")
        if ch is None:
            return  # the loader names the missing key
        ch = ch.to(torch.int64)
        if ch.dim() != 1 or ch.numel() != self.n or (ch.numel() and (int(ch.min()) < 0 or
                                                                     int(ch.max()) >= self.view.d_in)) \
                or ch.unique().numel() != ch.numel():
            raise AdapterFileError(f"'{where}': s2.channels must be {self.n} distinct channel ids in "
                                   f"[0, {self.view.d_in}) (an adapter for another base model?)")
        ch = ch.sort().values
        if not torch.equal(ch, self._channels):
            self.apply_permutation(self.permutation(ch))
            self._channels = ch
            with torch.no_grad():
                self.s2_channels.copy_(ch.to(self.s2_channels.device))

    def stats(self) -> dict[str, float]:
        return {"s2ft_channels": float(self.n)}
