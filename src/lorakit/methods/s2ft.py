"""S2FT: Structured Sparse Fine-Tuning (Yang et al. 2024, S2FT: Efficient, Scalable and Generalizable LLM
Fine-tuning by Structured Sparsity, NeurIPS 2024, arXiv:2412.06289; official code Infini-AI-Lab/S2FT: ``s2ft/s2.py``
and ``experiments/utils/s2_utils.py``).

S2FT selects a few structured units per block (FFN channels, attention heads), **co-permutes** the coupled weight
matrices so the selected units become contiguous (the block's function is unchanged), and trains a dense delta on
that contiguous block only. The four official units are implemented (down_proj columns, up_proj rows, v_proj rows,
o_proj columns: the official d/u/v/o ratios); the target's path decides which one it is.

**FFN channels** (a target matched by ``couple``: ``down_proj``, BERT's ``output.dense``, ...). In the target
(``(d_out, d_ffn)``) ``n`` intermediate channels ``S`` are chosen at random (seeded by the attach's ``seed``; how
many: ``select`` below). With ``π = [S (ascending), rest (ascending)]`` the rows of the modules that produce those
channels (``couple``: a target path suffix -> the producers' suffixes in its place: ``down_proj`` -> ``gate_proj``,
``up_proj``; BERT's ``output.dense`` -> ``intermediate.dense``) and the columns of the target are permuted by ``π``.
The activation and the gate product act channel-wise, so the function is unchanged, and

``ΔW_π[:, :n] = s2`` (``s2``: (d_out, n), init 0),   ``y = W_π x_π + s2 · x_π[..., :n]``

(the official ``S2RowLinear``; the slice is a view, not a gather). In the original coordinates ``ΔW[:, S] = s2``.

**FFN rows** (a target named like a producer in ``couple``: ``up_proj``, official ``u_ratio``): the output rows ``U``
of that producer train (an ``S2ColumnLinear``, ``ΔW_up,π[:|U|, :] = s2``). With the consumer (``down_proj``) also
targeted, the official ``convert_ffn_layer_to_s2`` orders the channels ``only_u + ud + only_d + rest`` (``ud = U∩D``)
and down's block is columns ``[|only_u|, |only_u|+|D|)``; with down alone this is ``[S, rest]`` above. Any one
producer of an FFN may be the row target (gate_proj works the same way; the official code trains up_proj).

**Attention heads** (a target whose module name is ``attention["v"]`` or ``attention["o"]`` next to the
``attention["q"]``/``["k"]`` projections of one attention module: Llama/Mistral/Qwen/SmolLM2's ``self_attn``). What
the official ``convert_mha_layer_to_s2`` does (read, not copied): ``V`` (heads whose ``v_proj`` rows train, official
``v_ratio``) and ``O`` (heads whose ``o_proj`` columns train, ``o_ratio``) are drawn at random; the head order is
``only_v + vo + only_o + rest`` (``only_v = V∖O``, ``vo = V∩O``, ``only_o = O∖V``); the rows of q_proj, k_proj and
v_proj and the columns of o_proj are permuted by that order as whole ``head_dim`` blocks (q/k must move with v: head
h's attention pattern weighs head h's values; rotary embedding acts within a head, so whole-head moves are safe);
then ``v_proj`` is an ``S2ColumnLinear`` whose trainable block is output rows ``[0, |V|·hd)`` and ``o_proj`` an
``S2RowLinear`` whose trainable block is input columns ``[|only_v|·hd, (|only_v|+|O|)·hd)`` (the two blocks
overlap on the ``vo`` heads). Here:

``v``: ``ΔW_v,π[:|V|·hd, :] = s2`` (``s2``: (|V|·hd, d_in)),  ``y = W_v,π x + pad(s2 · x)`` (rows [0, |V|·hd))
``o``: ``ΔW_o,π[:, a:b] = s2``  (``s2``: (d_out, b−a)),       ``y = W_o,π x_π + s2 · x_π[..., a:b]``

**Grouped-query attention** (SmolLM2: 9 query heads, 3 kv heads, head_dim 64). The official code reshapes q/k/v
into ``num_key_value_heads`` blocks and indexes them with an order over ``num_attention_heads``, which is only
consistent when the two are equal (with fewer kv heads the order indexes past them): LLaMA-2-7B, where the released
math/commonsense scripts use ``o_ratio`` 0.052; the LLaMA-3-8B scripts (the GQA model) set the v/o ratios to 0,
so the released code never trains heads under GQA. lorakit's choice under GQA: the unit is a **kv
group**, i.e. one kv head (``hd`` rows of k_proj and v_proj) together with the ``g = n_heads / n_kv`` query heads
that read it (``g·hd`` rows of q_proj, ``g·hd`` columns of o_proj). Moving a kv head must move its query heads with
it (HF's ``repeat_kv``: query head ``h`` reads kv head ``h // g``), and a selection of single query heads from
several groups could not be made contiguous, so ``V`` and ``O`` are sets of kv groups: a v unit is ``hd`` rows of
v_proj, an o unit ``g·hd`` columns of o_proj; ``ratio`` is a share of kv groups. Under plain
multi-head attention (``g = 1``) this is exactly the official head unit.

Head geometry: ``head_dim`` from the attention module's ``head_dim`` attribute (else the model config's ``head_dim``
or ``hidden_size // num_attention_heads``); ``n_heads = q.out_features / hd``, ``n_kv = k.out_features / hd``, all
checked. An attention module with any other parameter that is not shared by every head (OLMo-2's full-width q/k
norms, attention sinks) is refused: it would need permuting too. Biases of q/k/v are permuted with their rows.
BERT/MiniLM attention (``attention.self.{query,key,value}`` and ``attention.output.dense`` in different modules) is
refused with a TargetError: the official code covers LLaMA attention only.

Undoing the permutation: files hold ``s2`` and the ORIGINAL ids, sorted ascending and ``s2`` reordered to match
(``s2.channels``: input columns of down/o; ``s2.rows``: output rows of up/v), so a file is the plain sparse delta
``ΔW[:, ids] = s2`` / ``ΔW[ids, :] = s2`` and permutation-free; loading validates that the ids are whole units of
this base (AdapterFileError otherwise). ``detach`` and ``merge_and_unload`` apply ``π⁻¹`` to every permuted weight
(the merged targets included: ``W + ΔW`` in the original order). Permutation is pure indexing, so detach is
bit-exact and merged weights are exact outside the trained block.

Selection (``select``): the official scripts draw ``int(ratio · units of all layers)`` units at random over every
layer at once (``random.sample`` over layer-major flat ids; a layer may get none): ``select: global`` does that
(at least one unit in all, per kind of target -- down / up / v / o -- and ratio; an adapter may then hold an empty
``s2``, and a file's support decides each module's count when it is loaded). The default ``select: target`` draws
``max(1, round(ratio · units))`` in every target (the same share in every layer; lorakit's first S2FT did this, and
it keeps existing files and recipes as they were). Per-target ratios (the official separate d/u/v/o ratios) are
lorakit's ``overrides``. A co-permuted module may not carry another adapter (its rows move under it), and while S2FT
is attached no other adapter may be attached to a module it permutes (``rewritten_paths``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import Adapter, Adapted, param_owner, register
from ..errors import AdapterFileError, ConfigError, TargetError


def _default_couple() -> dict[str, list[str]]:
    # Llama/Mistral/Qwen/SmolLM2, OPT/Phi, BERT/MiniLM (layer.N.output.dense <- layer.N.intermediate.dense), GPT-NeoX
    return {"down_proj": ["gate_proj", "up_proj"], "fc2": ["fc1"], "output.dense": ["intermediate.dense"],
            "dense_4h_to_h": ["dense_h_to_4h"]}


def _default_attention() -> dict[str, str]:
    # the four projections of one attention module (siblings), Llama/Mistral/Qwen/SmolLM2 names
    return {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}


def _linear(m: nn.Module) -> nn.Linear:
    m = param_owner(m)
    if not isinstance(m, nn.Linear):
        raise TargetError(f"s2ft co-permutes nn.Linear producers; got {type(m).__name__}")
    if m.weight.dtype.is_floating_point is False:
        raise TargetError(f"s2ft co-permutes weights by indexing; {type(m).__name__} holds packed (quantised) "
                          "storage, which cannot be permuted row by row")
    return m


def _blocks(units: Tensor, size: int) -> Tensor:
    """Unit ids -> the ids of their ``size`` consecutive rows/columns (in the same unit order)."""
    return (units.to(torch.int64)[:, None] * size + torch.arange(size)).reshape(-1)


def _relative(cur: Tensor | None, tgt: Tensor | None, n: int) -> Tensor | None:
    """Positions in the current layout (``cur[k]`` holds original unit ``cur[k]``) that give layout ``tgt``."""
    if cur is None and tgt is None:
        return None
    tgt = tgt if tgt is not None else torch.arange(n)
    if cur is None:
        return tgt
    inv = torch.empty_like(cur)
    inv[cur] = torch.arange(cur.numel())
    return inv[tgt]


@torch.no_grad()
def _take(p: Tensor | None, idx: Tensor, dim: int) -> None:
    if p is not None:
        p.copy_(p.index_select(dim, idx.to(p.device)))


class _Unit:
    """What the FFN and attention units share: two roles trained as contiguous blocks after the official order
    ``only_first + both + only_second + rest`` (each part ascending), the permutation applied now, the paths it
    rewrites."""

    first = second = ""

    def __init__(self, n_units: int):
        self.n_units = n_units
        self.roles: dict[str, "S2FT"] = {}
        self.applied: Tensor | None = None
        self.paths: tuple[str, ...] = ()  # the modules whose weights it permutes

    @property
    def adapters(self) -> tuple["S2FT", ...]:
        return tuple(self.roles.values())

    def _parts(self) -> tuple[list[int], list[int], list[int], list[int]]:
        A = set(self.roles[self.first]._units.tolist()) if self.first in self.roles else set()
        B = set(self.roles[self.second]._units.tolist()) if self.second in self.roles else set()
        return sorted(A - B), sorted(A & B), sorted(B - A), [u for u in range(self.n_units) if u not in A | B]

    def _layout(self, w_first: int, w_second: int) -> Tensor:
        """The unit order ``only_first + both + only_second + rest``; sets each role's block ``[start, stop)`` and
        its original ids in block order, a unit being ``w_first`` rows/columns of the first role's weight and
        ``w_second`` of the second's."""
        only_a, both, only_b, rest = self._parts()
        if self.first in self.roles:
            a = self.roles[self.first]
            a._start, a._stop = 0, (len(only_a) + len(both)) * w_first
            a._ids = _blocks(torch.tensor(only_a + both, dtype=torch.int64), w_first)
        if self.second in self.roles:
            a = self.roles[self.second]
            a._start, a._stop = len(only_a) * w_second, (len(only_a) + len(both) + len(only_b)) * w_second
            a._ids = _blocks(torch.tensor(both + only_b, dtype=torch.int64), w_second)
        return torch.tensor(only_a + both + only_b + rest, dtype=torch.int64)

    def refresh(self) -> None:
        self.apply(self.order())


class _Channels(_Unit):
    """FFN unit: the channels between the producers (gate/up: rows) and the consumer (down: columns) of one FFN,
    permuted by channel; roles ``"ffn"`` (the consumer's columns train) and ``"u"`` (a producer's rows train)."""

    first, second = "u", "ffn"

    def __init__(self, consumer: nn.Linear, producers: tuple[nn.Linear, ...]):
        super().__init__(consumer.in_features)
        self.consumer, self.producers = consumer, producers

    def order(self) -> Tensor:
        """``only_u + ud + only_d + rest`` (each part ascending), as the official ``convert_ffn_layer_to_s2``;
        with the consumer alone: ``[S, rest]``."""
        return self._layout(1, 1)

    @torch.no_grad()
    def apply(self, perm: Tensor | None) -> None:
        rel = _relative(self.applied, perm, self.n_units)
        if rel is None:
            return
        _take(self.consumer.weight, rel, 1)
        for p in self.producers:
            _take(p.weight, rel, 0)
            _take(p.bias, rel, 0)
        self.applied = perm


class _Heads(_Unit):
    """Attention-head unit: one attention module's q/k/v rows and o columns, permuted by whole kv groups."""

    first, second = "v", "o"

    def __init__(self, path: str, q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear, hd: int, n_heads: int,
                 n_kv: int):
        super().__init__(n_kv)
        self.path, self.q, self.k, self.v, self.o = path, q, k, v, o
        self.hd, self.n_heads = hd, n_heads
        self.g = n_heads // n_kv

    def order(self) -> Tensor:
        """``only_v + vo + only_o + rest`` over kv groups (each part ascending), as the official code orders heads;
        sets each member's block ``[start, stop)`` and its original ids in block order."""
        return self._layout(self.hd, self.g * self.hd)  # v rows: one kv head; o columns: the group's query heads

    @torch.no_grad()
    def apply(self, perm: Tensor | None) -> None:
        rel = _relative(self.applied, perm, self.n_units)
        if rel is None:
            return
        kv, qo = _blocks(rel, self.hd), _blocks(rel, self.g * self.hd)
        for lin, idx in ((self.q, qo), (self.k, kv), (self.v, kv)):
            _take(lin.weight, idx, 0)
            _take(lin.bias, idx, 0)
        _take(self.o.weight, qo, 1)
        self.applied = perm


class _Permutation:
    """Handle returned by ``bind``: ``remove()`` puts the original order back."""

    def __init__(self, blocks: list):
        self.blocks = blocks

    def remove(self) -> None:
        for b in self.blocks:
            for a in b.adapters:
                h = a._host[0] if a._host else None
                if h is not None and h.merged_names:  # detach while merged: back to the permuted unmerged weight
                    h.unmerge()                          # first (after merge_and_unload there is nothing to restore)
            b.apply(None)


@register("s2ft", family="sparse",
          paper="Yang et al. 2024, S2FT: Efficient, Scalable and Generalizable LLM Fine-tuning by Structured "
                "Sparsity, NeurIPS 2024, arXiv:2412.06289")
class S2FT(Adapter):
    __doc__ = __doc__
    layers = ("linear",)
    example = {"ratio": 0.25, "targets": ["lin1", "down_proj", "up_proj", "v_proj", "o_proj"],
               "couple": {"lin1": ["lin0"], "down_proj": ["gate_proj", "up_proj"]}}
    exclusive = ("it co-permutes the weights of its targets and of their producers: another adapter on them would "
                 "see permuted channels")
    budget_exempt = "its share of FFN channels / attention heads is a ratio (float), not a rank-like integer knob"

    @dataclass
    class Config:
        # share of each target's units that train: FFN channels of a `couple` consumer or producer (official d_ratio,
        # u_ratio), kv groups (heads) of an attention v/o target (v_ratio, o_ratio); per-target values: `overrides`
        ratio: float = 0.03
        # target path suffix -> the modules (that suffix replaced) whose output rows produce the target's input channels
        couple: dict = field(default_factory=_default_couple)
        # the q/k/v/o projections of one attention module (sibling names): targets named like v or o train heads
        attention: dict = field(default_factory=_default_attention)
        # "target": ratio of each target's own units (at least one); "global": the official draw, max(1,
        # floor(ratio · all units)) units at random over every target of one kind (FFN / v / o) and ratio, so a
        # layer may get none
        select: Literal["target", "global"] = "target"

        def validate(self) -> None:
            if not 0 < self.ratio <= 1:
                raise ConfigError(f"s2ft: ratio must be in (0, 1], got {self.ratio}")
            for k, v in self.couple.items():
                if not isinstance(v, list) or not all(isinstance(s, str) for s in v) or not v:
                    raise ConfigError(f"s2ft: couple.{k} must be a non-empty list of module names, got {v!r}")
            if not isinstance(self.attention, dict) or set(self.attention) != {"q", "k", "v", "o"} or \
                    not all(isinstance(s, str) and s for s in self.attention.values()) or \
                    len(set(self.attention.values())) != 4:
                raise ConfigError("s2ft: attention must map q, k, v, o to four distinct module names (siblings in "
                                  f"one attention module), got {self.attention!r}")

    def __init__(self, base: nn.Module, cfg: Config, view=None):
        super().__init__(base, cfg, view)
        n = max(1, round(cfg.ratio * self.view.d_in))
        self.n = n
        self.s2 = nn.Parameter(torch.zeros(self.view.d_out, n))
        self.register_buffer("s2_channels", torch.arange(n))
        self.role = "ffn"  # "ffn" (down columns) | "u" (up rows) | "v" | "o": set by share() from the target's path
        self._axis = 1  # the trained block: columns (1: ffn, o) or rows (0: v) of the target
        self._start, self._stop = 0, n  # the block in the current (permuted) coordinates
        self._ids = torch.arange(n)  # original row/column ids of the block, in block order (CPU)
        self._units = torch.arange(n)  # the selected units (channels or kv groups), ascending (CPU)
        self._block = None  # the _Channels / _Heads this adapter's permutation belongs to
        self._host: tuple[Adapted, ...] = ()
        self._path = ""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.s2)

    # --- compute (in the permuted coordinates of the current weights) ----------------------------------------------
    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        x = self.cast_in(x)
        if self._axis == 1:  # S2RowLinear: the block of input channels
            return y + F.linear(x[..., self._start: self._stop], self.s2).to(y.dtype)
        d = F.linear(x, self.s2).to(y.dtype)  # S2ColumnLinear: the block of output rows
        return y + F.pad(d, (self._start, self.view.d_out - self._stop))

    def delta_weight(self) -> Tensor:
        d = torch.zeros(self.view.d_out, self.view.d_in, dtype=torch.float32, device=self.s2.device)
        if self._axis == 1:
            d[:, self._start: self._stop] = self.s2.float()
        else:
            d[self._start: self._stop] = self.s2.float()
        return d

    def original_delta(self) -> Tensor:
        """``ΔW`` in the original order (``ΔW[:, ids] = s2``, or ``ΔW[ids, :] = s2`` for a v target)."""
        d = torch.zeros(self.view.d_out, self.view.d_in, dtype=torch.float32, device=self.s2.device)
        if self._axis == 1:
            d[:, self._ids] = self.s2.float()
        else:
            d[self._ids] = self.s2.float()
        return d

    def _resize(self, shape: tuple[int, int], n_ids: int) -> None:
        """A head target's block differs from the FFN shape built in __init__ (the role is known only in share)."""
        s2, ch = self.s2, self.s2_channels
        self.s2 = nn.Parameter(torch.zeros(shape, dtype=s2.dtype, device=s2.device), requires_grad=s2.requires_grad)
        self.s2_channels = torch.zeros(n_ids, dtype=ch.dtype, device=ch.device)

    def _sync_ids(self) -> None:
        if self.s2_channels.device.type != "meta":
            with torch.no_grad():
                self.s2_channels.copy_(self._ids.to(self.s2_channels.device))

    # --- whole attach ----------------------------------------------------------------------------------------------
    @classmethod
    def _producer(cls, att, own: dict, path: str, target: str) -> nn.Linear:
        """The plain nn.Linear at ``path`` (a member of this attach: its base) that moves with ``target``."""
        if path in own:
            return own[path].adapter.base
        try:
            mod = att.model.get_submodule(path)
        except AttributeError:
            raise TargetError(f"s2ft: '{target}' couples with '{path}', which this model does not have") from None
        if isinstance(mod, Adapted) and len(mod.adapters):
            raise TargetError(f"s2ft: producer '{path}' of '{target}' carries adapters {sorted(mod.adapters)}; its "
                              "rows would move under them")
        return _linear(mod)

    @classmethod
    def _head_geometry(cls, att, parent: str, q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear,
                       names: dict) -> tuple[int, int, int]:
        attn = att.model.get_submodule(parent)
        conf = getattr(att.model, "config", None)
        hd = getattr(attn, "head_dim", None)
        if not isinstance(hd, int):
            hd = getattr(conf, "head_dim", None)
        if not isinstance(hd, int) and getattr(conf, "num_attention_heads", None):
            hd = conf.hidden_size // conf.num_attention_heads
        if not isinstance(hd, int) or hd <= 0:
            raise TargetError(f"s2ft: cannot tell the head size of '{parent}' (no head_dim on the module or the "
                              "model config)")
        if q.out_features % hd or k.out_features % hd or k.out_features != v.out_features or \
                o.in_features != q.out_features:
            raise TargetError(f"s2ft: '{parent}' is not a multi-head attention of head size {hd} (q {q.out_features}"
                              f", k {k.out_features}, v {v.out_features} outputs, o {o.in_features} inputs)")
        n_heads, n_kv = q.out_features // hd, k.out_features // hd
        if n_heads % n_kv:
            raise TargetError(f"s2ft: '{parent}' has {n_heads} query heads, not a multiple of its {n_kv} kv heads")
        g = getattr(attn, "num_key_value_groups", None)
        if isinstance(g, int) and g != n_heads // n_kv:
            raise TargetError(f"s2ft: '{parent}' declares {g} query heads per kv head, its shapes give "
                              f"{n_heads // n_kv}")
        mine = {id(p) for lin in (q, k, v, o) for p in lin.parameters()}
        for pn, p in attn.named_parameters():
            if id(p) not in mine and pn.split(".")[0] not in names.values() and p.numel() != hd:
                raise TargetError(f"s2ft: '{parent}.{pn}' ({tuple(p.shape)}) is not shared by every head; it would "
                                  "have to move with the heads, which s2ft does not do")
        return hd, n_heads, n_kv

    @classmethod
    def share(cls, att) -> None:
        """Pick each target's units (the attach's seeded RNG) and find the co-permuted modules, before anything
        changes."""
        own = {m.path: m for m in att.members}
        heads: dict[str, _Heads] = {}
        ffn: dict[str, _Channels] = {}
        for m in att.members:
            a = m.adapter
            if isinstance(m.host, Adapted) and len(m.host.adapters):
                raise TargetError(f"s2ft: '{m.path}' already carries adapters {sorted(m.host.adapters)}; their "
                                  "columns would move under them")
            a._host, a._path = (m.host,), m.path
            # an FFN consumer (down_proj: its input channels) or producer (up_proj: its output rows); an output
            # projection inside an attention block (BERT's attention.output.dense) is neither
            hits = [(k, nm) for k in a.cfg.couple for nm in (None, *a.cfg.couple[k])
                    if m.path == (nm or k) or m.path.endswith("." + (nm or k))]
            hits = [(k, nm) for k, nm in hits if not any("attn" in c or "attention" in c
                                                         for c in m.path[: len(m.path) - len(nm or k)].split("."))]
            parent, _, leaf = m.path.rpartition(".")
            names = a.cfg.attention
            if hits:  # FFN channels
                key, nm = max(hits, key=lambda h: len(h[1] or h[0]))
                prefix = m.path[: len(m.path) - len(nm or key)]
                blk = ffn.get(prefix + key)
                if blk is None:
                    consumer = cls._producer(att, own, prefix + key, m.path)
                    prods = []
                    for pn in a.cfg.couple[key]:
                        lin = cls._producer(att, own, prefix + pn, m.path)
                        if lin.out_features != consumer.in_features:
                            raise TargetError(f"s2ft: producer '{prefix + pn}' has {lin.out_features} outputs, "
                                              f"'{prefix + key}' {consumer.in_features} inputs")
                        prods.append(lin)
                    blk = ffn[prefix + key] = _Channels(consumer, tuple(prods))
                    blk.paths = (prefix + key, *(prefix + pn for pn in a.cfg.couple[key]))
                role = "ffn" if nm is None else "u"
                if role in blk.roles:
                    raise TargetError(f"s2ft: '{m.path}' and '{blk.roles[role]._path}' both train the rows of the "
                                      f"channels of '{prefix + key}'; target one producer (up_proj) per FFN")
                a.role, a._block, a._axis = role, blk, 1 if role == "ffn" else 0
                blk.roles[role] = a
            elif leaf in (names["v"], names["o"]):  # attention heads
                role = "v" if leaf == names["v"] else "o"
                blk = heads.get(parent)
                if blk is None:
                    pre = parent + "." if parent else ""
                    lins = {r: cls._producer(att, own, pre + names[r], m.path) for r in ("q", "k", "v", "o")}
                    hd, n_heads, n_kv = cls._head_geometry(att, parent, *(lins[r] for r in "qkvo"), names)
                    blk = heads[parent] = _Heads(parent, *(lins[r] for r in "qkvo"), hd, n_heads, n_kv)
                    blk.paths = tuple(pre + names[r] for r in "qkvo")
                a.role, a._block, a._axis = role, blk, 0 if role == "v" else 1
                blk.roles[role] = a
            else:
                raise TargetError(
                    f"s2ft: '{m.path}' has no coupled producers (couple maps an FFN target's path suffix to the "
                    f"modules that produce its input channels; it has {sorted(a.cfg.couple)}) and is not an "
                    f"attention value/output projection (attention: v '{names['v']}' or o '{names['o']}', siblings "
                    f"of q '{names['q']}' and k '{names['k']}' in one attention module, LLaMA-style as in the "
                    "official code; BERT/MiniLM attention, whose query/key/value and output projections live in "
                    "different modules, is not supported); target FFN output projections such as down_proj, or "
                    "v_proj/o_proj")
        cls._draw([m.adapter for m in att.members])
        for b in {id(m.adapter._block): m.adapter._block for m in att.members}.values():
            b.order()
            for a in b.adapters:
                a._sync_ids()

    @classmethod
    def _draw(cls, ads: list["S2FT"]) -> None:
        """The selected units of every adapter (the attach's seeded RNG, in member order)."""
        pools: dict[tuple, list[S2FT]] = {}
        for a in ads:
            if a.cfg.select == "global":
                pools.setdefault((a.role, a.cfg.ratio), []).append(a)
            else:
                total = a._block.n_units
                a._set_units(torch.randperm(total)[: max(1, round(a.cfg.ratio * total))].sort().values)
        for (_, ratio), group in pools.items():  # the official draw: flat ids over the targets in member order
            sizes = torch.tensor([a._block.n_units for a in group])
            k = max(1, int(ratio * int(sizes.sum())))
            flat = torch.randperm(int(sizes.sum()))[:k].sort().values
            starts = torch.cumsum(sizes, 0) - sizes
            owner = torch.searchsorted(torch.cumsum(sizes, 0), flat, right=True)
            for i, a in enumerate(group):
                a._set_units(flat[owner == i] - starts[i])

    def _set_units(self, units: Tensor) -> None:
        """Adopt ``units`` (ascending) and size ``s2`` for them."""
        self._units = units.to(torch.int64)
        n, u = units.numel(), self._unit()
        self.n = n
        shape = (n * u, self.view.d_in) if self._axis == 0 else (self.view.d_out, n * u)
        if tuple(self.s2.shape) != shape:
            self._resize(shape, n * u)

    @classmethod
    def rewritten_paths(cls, att) -> set[str]:
        """Every module this attach permutes (targets and their producers / q, k, v, o)."""
        return {p for m in att.members if m.adapter._block is not None for p in m.adapter._block.paths}

    @classmethod
    def bind(cls, att) -> list:
        blocks = []
        for m in att.members:
            b = m.adapter._block
            if b is not None and all(b is not c for c in blocks):
                blocks.append(b)
        for b in blocks:
            b.refresh()
        return [_Permutation(blocks)]

    # --- file ------------------------------------------------------------------------------------------------------
    @property
    def _id_key(self) -> str:
        return "s2.rows" if self._axis == 0 else "s2.channels"

    def _unit(self) -> int:
        """Rows/columns per unit (1 for FFN channels; hd for v; g·hd for o)."""
        b = self._block
        return 1 if self.role in ("ffn", "u") else b.hd if self.role == "v" else b.g * b.hd

    def to_file(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """``s2`` and its original ids, sorted ascending (a permutation-free sparse delta)."""
        s2, ids = state["s2"], state["s2_channels"]
        if ids.device.type == "meta" or s2.device.type == "meta":
            return {"s2.weight": s2, self._id_key: ids}
        idx = ids.to(torch.int64).argsort()
        return {"s2.weight": s2.index_select(self._axis, idx.to(s2.device)), self._id_key: ids[idx]}

    def from_file(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """File (ascending ids) -> this adapter's block order (its ids after ``fit_file``)."""
        s2, ids = state["s2.weight"], state[self._id_key].to(torch.int64).cpu()
        srt, idx = ids.sort()
        if not torch.equal(srt, self._ids.sort().values):  # not fitted to this file (a standalone adapter): as is
            return {"s2": s2, "s2_channels": state[self._id_key]}
        pos = idx[torch.searchsorted(srt, self._ids)]
        return {"s2": s2.index_select(self._axis, pos.to(s2.device)), "s2_channels": self._ids.clone()}

    def fit_file(self, tensors: dict[str, Tensor], where: str) -> None:
        ids = tensors.get(self._id_key)
        if ids is None:
            return  # the loader names the missing key
        ids = ids.to(torch.int64).cpu()
        size = self.view.d_in if self._axis == 1 else self.view.d_out
        unit = self._unit()
        what = {"ffn": "channel", "u": "row", "v": "row", "o": "column"}[self.role]
        count = self.n * unit if self.cfg.select == "target" else None  # global: the file's support decides
        bad = ids.dim() != 1 or (ids.numel() != count if count is not None else ids.numel() % unit != 0) or \
            ids.unique().numel() != ids.numel() or (ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= size))
        srt = ids.sort().values if not bad else ids
        units = srt.reshape(-1, unit)[:, 0] // unit if not bad else torch.zeros(0, dtype=torch.int64)
        if not bad and unit > 1 and not torch.equal(_blocks(units, unit), srt):
            bad = True
        if bad:
            extra = (f", whole {'kv heads' if self.role == 'v' else 'kv groups'} of {unit} consecutive {what}s "
                     "each") if unit > 1 else ""
            raise AdapterFileError(f"'{where}': {self._id_key} must be "
                                   f"{count if count is not None else 'a multiple of ' + str(unit) + ','} distinct "
                                   f"{what} ids in [0, {size}){extra} (an adapter for another base model?)")
        if not torch.equal(units, self._units):
            self._set_units(units)
            self._block.refresh()
            for a in self._block.adapters:
                a._sync_ids()

    def stats(self) -> dict[str, float]:
        return {"s2ft_channels": float(self.n)} if self.role in ("ffn", "u") else {"s2ft_head_groups": float(self.n)}
