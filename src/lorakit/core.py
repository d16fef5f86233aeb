"""The one abstraction: an :class:`Adapter` is a trainable change to ONE frozen module.

Everything else in lorakit (injection, files, merging, training, the arena, serving) is written once against
this interface, so a new method is one small file in ``lorakit/methods`` plus its test.

Geometry. Every adaptable layer is seen as a matrix ``W`` of shape ``(d_out, d_in)`` (``nn.Linear`` layout), by
:class:`LayerView`:

======================  ====================  ==================================================
layer                   ``W`` (d_out, d_in)   how an input reaches the rank space
======================  ====================  ==================================================
``nn.Linear``           ``weight``            ``x @ A.T``
transformers ``Conv1D`` ``weight.T``          ``x @ A.T`` (the stored weight is transposed)
``nn.Embedding``        ``weight.T``          ``embedding(ids, A.T)`` (``d_in`` = vocabulary)
``nn.Conv2d``           ``weight.flatten(1)`` ``conv2d(x, A.view(r, c_in, kh, kw))``; up = 1x1 conv
======================  ====================  ==================================================

A method writes its maths with ``view.down(x, A)``, ``view.up(h, B)``, ``view.rank_scale(h, v)``,
``view.rank_mix(h, M)`` and ``view.dense(x, M)``, and works on every layer type for free. A scaled embedding
(``embed_scale``) is scaled in ``down``, so such deltas are scaled like the base output.

Tied weights: merging into a base whose weight Parameter other modules share writes into a private copy
(:func:`untie`) and unmerging/detaching puts the shared Parameter back (:func:`retie`); see docs/design.md.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import quant
from .errors import ConfigError, MergeError, TargetError

__all__ = [
    "LowRank", "LowRankConfig", "PeftSpec", "LayerView", "Adapter", "Adapted", "ModulesToSave", "BatchContext",
    "register", "REGISTRY", "get_method", "adaptable", "Factor", "embed_scale", "ParamView", "param_owner",
]


# ----------------------------------------------------------------------------------------------------------------
# Small value types
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LowRank:
    """A low-rank view ``ΔW = scale · B @ A`` used by optimisers, merging, serving and PEFT export.

    ``A``: (r, d_in), ``B``: (d_out, r). ``magnitude`` is set for DoRA-like methods (then the served weight is
    ``magnitude/‖W+ΔW‖_row ⊙ (W+ΔW)``).
    """

    A: Tensor
    B: Tensor
    scale: float
    magnitude: Tensor | None = None


@dataclass
class LowRankConfig:
    """The options of every method that learns ``ΔW = s·B A`` with LoRA's scale ``s = alpha/r`` (rsLoRA:
    ``alpha/√r``): LoRA, DoRA, PiSSA, QLoRA, LQ-LoRA, DyLoRA, SoRA, CorDA, LoRA-GA, BA-LoRA, KaSA.

    A method's ``Config`` extends it (``class Config(LowRankConfig)``) and redeclares a field to change its default
    (``r: int = 64``). ``lora_bias`` and ``init`` are LoRA's own switches: here they are *fixed* at their defaults
    (``init=False``: refused as config keys, never written to files) and LoRA redeclares them as options. A method
    that cannot honour one of the base options fixes it the same way, e.g. ``rslora: bool = field(default=False,
    init=False)`` (DyLoRA, SoRA), instead of overwriting the user's value after construction.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    lora_bias: bool = field(default=False, init=False)
    init: str = field(default="default", init=False)


@dataclass(frozen=True)
class PeftSpec:
    """How a method maps onto a PEFT ``adapter_config.json``.

    ``peft_type``: PEFT's type string ("LORA", "VERA", ...). ``fields``: lorakit config field -> PEFT key.
    ``fixed``: PEFT keys whose value identifies this method (``{"use_dora": True}``); ``load_match`` tells which
    of those a PEFT file must carry for this method to be chosen when loading. ``default``: PEFT key defaults used
    when a PEFT file leaves a mapped key out.
    """

    peft_type: str
    fields: dict[str, str] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    load_match: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GrownSlots:
    """Slots ``start:stop`` along dimension ``dim`` of an adapter's parameter ``param`` (its local name) that a
    growth step just made new (see :meth:`Adapter.note_grown`)."""

    param: str
    dim: int
    start: int
    stop: int
    warmup: int | None = None  # None: the run's LR warmup
    weight_decay: float | None = None


class BatchContext:
    """Per-batch information shared by every adapter of one model (task ids for multi-task methods, ...).

    The trainer (or a user) sets it with :func:`lorakit.batch_context`; adapters read ``self.ctx.get(key)``.
    """

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)


# ----------------------------------------------------------------------------------------------------------------
# Layer geometry
# ----------------------------------------------------------------------------------------------------------------
def _is_hf_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "weight")


def adaptable(m: nn.Module) -> str | None:
    """The layer kind lorakit can host, or None."""
    if isinstance(m, nn.Linear):
        return "linear"
    if _is_hf_conv1d(m):
        return "conv1d"
    if isinstance(m, nn.Embedding):
        return "embedding"
    if isinstance(m, nn.Conv2d):
        return "conv2d"
    return None


def embed_scale(m: nn.Module) -> float | Tensor | None:
    """The constant an embedding module multiplies its output by (its ``embed_scale`` attribute: a number or a
    one-element tensor, as transformers' ``*ScaledWordEmbedding`` classes declare it), or None if it has none.

    Detected by the declared attribute, not by class name; anything else under that name is refused, because the
    adapter could not know how the module scales its output."""
    s = getattr(m, "embed_scale", None)
    if s is None or isinstance(s, bool):
        return None
    if isinstance(s, (int, float)):
        return float(s)
    if isinstance(s, Tensor) and s.numel() == 1:
        return s
    raise TargetError(f"{type(m).__name__} declares embed_scale={s if not isinstance(s, Tensor) else tuple(s.shape)}"
                      "; lorakit adapts scaled embeddings whose embed_scale is a number or a one-element tensor")


class LayerView:
    """The matrix view of one base layer (see the module docstring)."""

    def __init__(self, base: nn.Module):
        kind = adaptable(base)
        if kind is None:
            raise TargetError(f"cannot adapt a {type(base).__name__}: lorakit hosts nn.Linear, transformers Conv1D, "
                              "nn.Embedding and nn.Conv2d")
        self.kind = kind
        w = base.weight
        if not w.is_floating_point():  # packed storage (bitsandbytes, ...): its shape is not the layer's
            if not quant.has_weight_io(base):
                raise TargetError(f"cannot adapt a {type(base).__name__}: its weight is stored as {w.dtype} "
                                  f"({type(w).__name__}) and lorakit has no reader for it; teach it one with "
                                  "lorakit.quant.register_weight_io")
            w = quant.get_weight(base)  # the dense weight (also checks that this storage can be read here)
        if kind == "linear":
            self.d_out, self.d_in = w.shape
        elif kind == "conv1d":
            self.d_in, self.d_out = w.shape
        elif kind == "embedding":
            self.d_in, self.d_out = w.shape  # d_in = num_embeddings, d_out = embedding_dim
            self.padding_idx = base.padding_idx
            # a scaled embedding (transformers' *ScaledWordEmbedding: output = table[ids] · embed_scale) declares
            # its scale as ``embed_scale``; the adapter's delta must go through it as the base output does
            self._scaled = base if embed_scale(base) is not None else None
        else:
            if base.groups != 1:
                raise TargetError(f"cannot adapt a grouped Conv2d (groups={base.groups})")
            self.d_out = w.shape[0]
            self.d_in = w[0].numel()
            self.in_shape = tuple(w.shape[1:])
            self.stride, self.padding, self.dilation = base.stride, base.padding, base.dilation
            if isinstance(self.padding, str) or getattr(base, "padding_mode", "zeros") != "zeros":
                self.padding_mode, self._conv = base.padding_mode, base
            else:
                self.padding_mode, self._conv = "zeros", None

    # --- weight layout -------------------------------------------------------------------------------------------
    def matrix(self, weight: Tensor) -> Tensor:
        """Native weight -> (d_out, d_in) matrix."""
        if self.kind in ("conv1d", "embedding"):
            return weight.t()
        if self.kind == "conv2d":
            return weight.flatten(1)
        return weight

    def native(self, matrix: Tensor) -> Tensor:
        """(d_out, d_in) matrix -> native weight layout (contiguous)."""
        if self.kind in ("conv1d", "embedding"):
            return matrix.t().contiguous()
        if self.kind == "conv2d":
            return matrix.reshape(self.d_out, *self.in_shape).contiguous()
        return matrix.contiguous()

    # --- applying factors --------------------------------------------------------------------------------------
    def down(self, x: Tensor, A: Tensor) -> Tensor:
        """Apply an (r, d_in) matrix to the layer input: linear (..., r); conv (N, r, H', W').

        A scaled embedding's ``embed_scale`` is applied here, at the one entry from token ids into rank space, so
        every delta built from ``down``/``dense`` and linear maps after it (``up``, ``rank_scale``, ``rank_mix``)
        is scaled exactly as the base output is, and merging the unscaled ``ΔW`` into the table is exact."""
        if self.kind == "embedding":
            h = F.embedding(x, A.t(), padding_idx=self.padding_idx)
            if self._scaled is not None:
                s = embed_scale(self._scaled)
                h = h * (s.to(h.dtype) if isinstance(s, Tensor) else s)
            return h
        if self.kind == "conv2d":
            A4 = A.reshape(A.shape[0], *self.in_shape)
            if self._conv is not None:  # non-zero padding modes: reuse the base layer's padding logic
                return self._conv._conv_forward(x, A4, None)
            return F.conv2d(x, A4, None, self.stride, self.padding, self.dilation)
        return F.linear(x, A)

    def up(self, h: Tensor, B: Tensor) -> Tensor:
        """Apply a (d_out, r) matrix in rank space -> output space."""
        if self.kind == "conv2d":
            return F.conv2d(h, B.reshape(B.shape[0], B.shape[1], 1, 1))
        return F.linear(h, B)

    def rank_scale(self, h: Tensor, v: Tensor) -> Tensor:
        """Multiply the rank dimension of ``h`` by a vector (diagonal core)."""
        if self.kind == "conv2d":
            return h * v.view(1, -1, 1, 1)
        return h * v

    def rank_mix(self, h: Tensor, M: Tensor) -> Tensor:
        """Apply an (r_out, r_in) matrix in rank space."""
        return self.up(h, M)

    def out_scale(self, y: Tensor, v: Tensor) -> Tensor:
        """Multiply the output-feature dimension of ``y`` by a (d_out,) vector."""
        if self.kind == "conv2d":
            return y * v.view(1, -1, 1, 1)
        return y * v

    def dense(self, x: Tensor, M: Tensor) -> Tensor:
        """Apply a full (d_out, d_in) matrix exactly as the base layer would (no bias)."""
        return self.down(x, M)  # (d_out, d_in) is just an "A" with d_out rows

    def input_features(self, x: Tensor) -> Tensor:
        """Layer input as rows of d_in features (for calibration statistics); embeddings give one-hot rows."""
        if self.kind == "embedding":
            return F.one_hot(x.reshape(-1), self.d_in).float()
        if self.kind == "conv2d":
            kh, kw = self.in_shape[1:]
            cols = F.unfold(x, (kh, kw), dilation=self.dilation, padding=self.padding, stride=self.stride)
            return cols.transpose(1, 2).reshape(-1, self.d_in)
        return x.reshape(-1, self.d_in)


class ParamView(LayerView):
    """A parameter targeted by name (PEFT's ``target_parameters``), kind ``"param"``: a 2-D ``(d_out, d_in)`` weight,
    or the fused 3-D weight of ``E`` experts that transformers' MoE blocks hold as one Parameter, ``(E, d_out, d_in)``
    (or ``(E, d_in, d_out)`` when the module declares ``is_transposed``, as gpt-oss does; PEFT reads the same flag).

    ``matrix``/``native`` map it to ``(E, d_out, d_in)`` (2-D: ``(d_out, d_in)``). Such a weight is not applied to an
    input by the adapter: the host patches the parameter with ``adapter.merge(W)`` for the forward of its module,
    so ``down``/``up``/``dense`` are not available."""

    def __init__(self, owner: nn.Module, param: str):
        p = owner._parameters.get(param)
        if not isinstance(p, Tensor):
            raise TargetError(f"{type(owner).__name__} has no parameter '{param}'")
        self.kind, self.param, self.ndim = "param", param, p.dim()
        self.transposed = False
        if p.dim() == 3:
            self.experts = p.shape[0]
            self.transposed = bool(getattr(owner, "is_transposed", False))
            self.d_in, self.d_out = (p.shape[1], p.shape[2]) if self.transposed else (p.shape[2], p.shape[1])
        elif p.dim() == 2:
            self.experts = 1
            self.d_out, self.d_in = p.shape
        else:
            raise TargetError(f"parameter '{param}' of {type(owner).__name__} has {p.dim()} dimensions; "
                              "target_parameters adapts 2-D and 3-D (fused experts) parameters")

    def matrix(self, weight: Tensor) -> Tensor:
        return weight.transpose(-1, -2) if self.transposed else weight

    def native(self, matrix: Tensor) -> Tensor:
        return (matrix.transpose(-1, -2) if self.transposed else matrix).contiguous()

    def _patch_only(self, *_a: Any, **_k: Any) -> Tensor:
        raise TargetError(f"parameter target '{self.param}' is applied as a weight patch (adapter.merge), not to "
                          "inputs")

    down = up = rank_scale = rank_mix = out_scale = dense = input_features = _patch_only


def param_owner(m: nn.Module) -> nn.Module:
    """The module that really holds the parameters under a chain of hosts."""
    while isinstance(m, Adapted):
        m = m.base_layer
    return m


class Factor(nn.Module):
    """A bare parameter holder so a factor's file key is ``<name>.weight`` as in PEFT (``lora_A.weight``)."""

    def __init__(self, *shape: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(*shape))

    def extra_repr(self) -> str:
        return "x".join(str(s) for s in self.weight.shape)


# ----------------------------------------------------------------------------------------------------------------
# The abstraction
# ----------------------------------------------------------------------------------------------------------------
class Adapter(nn.Module):
    """A trainable change to ONE frozen module. Owns only its own parameters; the base layer is a reference.

    Subclasses set the class attributes below and implement ``reset_parameters`` plus either ``delta`` (additive
    methods) or ``forward`` (the rest), and ``delta_weight`` when ``mergeable``.
    """

    # --- declared structure (set by subclasses / @register) -----------------------------------------------------
    Config: ClassVar[type] = None  # type: ignore[assignment]
    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    peft: ClassVar[PeftSpec | None] = None
    mergeable: ClassVar[bool] = True
    # why this method cannot share its layers (or the layers it rewrites) with other adapters, e.g. S2FT co-permutes
    # the weights of its targets and their producers; the method refuses the overlap in share() (None: it can share)
    exclusive: ClassVar[str | None] = None
    # why the arena must not shrink/grow this method's rank-like knob to a shared trainable budget (None: it may)
    budget_exempt: ClassVar[str | None] = None
    roles: ClassVar[dict[str, str]] = {}  # parameter name -> role ("A", "B", "magnitude", "gate", ...)
    # optimiser defaults per role, as the method's authors train it: ``{"router": {"lr": 0.1, "weight_decay": 0.0}}``
    # (absolute lr; keys lr / weight_decay). The default param groups honour it; ``optim.role_optim`` overrides it.
    role_optim: ClassVar[dict[str, dict[str, float]]] = {}
    # the method grows its rank by turning slices of existing tensors into new slots during training (IncreLoRA,
    # TriAdaptLoRA): it reports them with ``note_grown`` and ``procedures.setup`` gives them fresh optimiser state
    # and a warmup (``lorakit.procedures.slots``), as a new parameter group would have in the authors' code.
    grows_slots: ClassVar[bool] = False
    layers: ClassVar[tuple[str, ...]] = ("linear", "conv1d")  # supported layer kinds
    init: ClassVar[str] = "noop"  # what attach does to the output: "noop" | "residual" (base replaced) | "changes"
    calibration: ClassVar[str | None] = None  # None | "activations" | "gradients": stats init_from needs
    # per-option inits (LoRA's ``init``: olora, eva, ...): option value -> (init kind, calibration); a method that
    # declares it takes ``init``/``calibration`` per config through :meth:`init_of`. Declared per class and NOT
    # inherited (PiSSA extends LoRA but its init is its own): a subclass that keeps the options redeclares them.
    inits: ClassVar[dict[str, tuple[str, str | None]]] = {}
    peft_keys: ClassVar[dict[str, dict[str, str]]] = {}  # layer kind -> {internal key: PEFT file key}
    frozen: ClassVar[tuple[str, ...]] = ()  # own parameters that never train (frozen SVD factors, ...)
    example: ClassVar[dict[str, Any]] = {}  # options for tiny test models (the contract suite uses them)
    rank_options: ClassVar[tuple[str, ...]] = ("r",)  # the options bounded by a layer's max rank (check_layer)

    @classmethod
    def max_rank(cls, view: "LayerView") -> int:
        """The largest value a rank option may take on this layer: ``min(d_out, d_in)`` (a rank above it adds
        nothing to ΔW and breaks the SVD/LU-based inits). A method whose rank means something else overrides it."""
        return min(view.d_out, view.d_in)

    @classmethod
    def check_layer(cls, cfg: Any, view: "LayerView") -> str | None:
        """What keeps this layer from hosting an adapter with ``cfg`` (None: nothing). ``attach`` calls it for every
        target before the first adapter is built, so an impossible rank (``r=2**40``) fails before any allocation
        and names the layer. The policy is the same for every method: a rank above the layer's maximum is an
        error, never silently clamped (docs/design.md)."""
        cap = cls.max_rank(view)
        for k in cls.rank_options:
            v = getattr(cfg, k, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > cap:
                return (f"{k}={v} exceeds this layer's maximum {cap} (d_out={view.d_out}, d_in={view.d_in}, "
                        f"kind {view.kind})")
        return None
    file_fields: ClassVar[tuple[str, ...]] = ()  # per-module Config fields that file_config encodes itself
    # rank surgery after training (lorakit.rank): every prefix rank is trained, so ``truncate(b)`` keeps the first b
    # (DyLoRA); or the rank is a mask over slots and ``kept_lowrank()`` gives the surviving ones (SoRA, AdaLoRA)
    nested_ranks: ClassVar[bool] = False
    masked_rank: ClassVar[bool] = False
    # how the per-module extra_loss() values of ONE attach combine (see attach_loss): "sum" | "mean"
    loss_reduction: ClassVar[str] = "sum"
    # The server's fast path (set with @register(..., fast_serve=...), so subclasses do not inherit it): the file
    # holds PEFT's ``lora_A.weight`` (r, d_in) / ``lora_B.weight`` (d_out, r) per module and the adapter computes
    # exactly ``scale_of(alpha, r, rslora)·B A`` from its LowRankConfig ("lowrank"), plus a DoRA-style row gain from
    # ``lora_magnitude_vector`` ("lowrank+magnitude"); the bank then reads the factors without building adapters.
    # None: the bank builds the adapter and asks ``lowrank()``.
    fast_serve: ClassVar[str | None] = None
    # Why this method cannot train with a sharded base (``train.distributed=fsdp``, FSDP2), or None when it can.
    # Under FSDP2 the base weight is a local shard outside the base layer's own forward; the adapters themselves
    # stay whole on every rank (lorakit.train.distributed). A method that reads or writes the base weight at other
    # times during training (a controller merging into the base, a forward reading another layer's weight) says
    # so here, and config resolution refuses the combination with this reason.
    fsdp_unsupported: ClassVar[str | None] = None
    # Buffers that add up a statistic over the rows of the current optimiser step (SMoRA's per-expert token counts
    # for its bias update). Data-parallel training sums them over the ranks before the controllers run, so every
    # rank sees the count of the whole global batch, as one process does.
    summed_buffers: ClassVar[tuple[str, ...]] = ()
    # Whether training needs the model's output head run on EVERY position (full (batch, seq, vocab) logits in the
    # outputs handed to ``output_loss``, or the head's input at every position, e.g. X-LoRA's hook on it). Tasks
    # otherwise compute logits only where a loss or metric reads them (``lorakit.tasks.logits``). None: True exactly
    # when the class overrides ``output_loss`` (a loss on the outputs may read any position).
    full_logits: ClassVar[bool | None] = None
    # The inference forward begins with ``x·lora_A.weightᵀ`` on the layer's own input (LoRA's form), so the
    # adapters of sibling layers reading one input can share one GEMM (``lorakit.fusion``; the class's ``share``
    # groups them and its forward asks the group). False: every adapter computes its own path.
    fuse_down: ClassVar[bool] = False

    def __init__(self, base: nn.Module, cfg: Any, view: LayerView | None = None):
        super().__init__()
        self.cfg = cfg
        self.view = view if view is not None else LayerView(base)
        self._base = (base,)  # a reference, not a submodule: the adapter never owns the base
        self.ctx: BatchContext | None = None

    # The base layer (read its weight only in delta_weight/merge/init_from, never in forward paths under FSDP).
    @property
    def base(self) -> nn.Module:
        return self._base[0]

    def base_matrix(self) -> Tensor:
        """The base weight as a (d_out, d_in) matrix (a view where possible)."""
        return self.view.matrix(quant.get_weight(self.base))

    def cast_in(self, x: Tensor) -> Tensor:
        """The layer input in the adapter's dtype (token ids pass through)."""
        p = next(self.parameters(), None)
        return x.to(p.dtype) if p is not None and x.is_floating_point() and x.dtype != p.dtype else x

    def base_bias(self) -> Tensor | None:
        return getattr(self.base, "bias", None)

    @classmethod
    def init_of(cls, cfg: Any) -> tuple[str, str | None]:
        """``(init kind, calibration)`` for one module's config: the class values, or the entry of :attr:`inits`
        for the config's ``init`` option (LoRA's ``init="eva"`` needs activations, ``"olora"`` is residual)."""
        own = cls.own_inits()
        opt = getattr(cfg, "init", None)
        if own and isinstance(opt, str) and opt in own:
            return own[opt]
        return cls.init, cls.calibration

    @classmethod
    def changes_base(cls, cfg: Any) -> bool:
        """Whether the init for ``cfg`` writes a new base weight (residual inits; LoRA's ``olora``/``loftq``): the
        file's factors then apply to that base, not the original (servers must not take the fast path)."""
        return cls.init_of(cfg)[0] == "residual"

    @classmethod
    def own_inits(cls) -> dict[str, tuple[str, str | None]]:
        """The :attr:`inits` this class declares itself ({} when it only inherits them)."""
        return cls.__dict__.get("inits") or {}

    # --- lifecycle -----------------------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Data-free init."""

    @torch.no_grad()
    def init_from(self, weight: Tensor, stats: dict | None = None) -> Tensor | None:
        """Data-dependent init from the fp32 (d_out, d_in) base matrix; may return a new base matrix."""
        return None

    def on_load(self, weight: Tensor, state: dict[str, Tensor]) -> Tensor | None:
        """Called by ``load_adapter`` before the file's tensors are set. Residual inits rebuild the base they were
        trained on (default: recompute ``init_from`` without data); data-driven ones override this."""
        if self.init == "residual":
            return self.init_from(weight, None)
        return None

    def clear_cache(self) -> None:
        """Drop anything cached from the parameters (called after they are changed outside of training)."""

    # --- compute ---------------------------------------------------------------------------------------------------
    def delta(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} defines neither delta() nor forward()")

    def forward(self, x: Tensor, y: Tensor) -> Tensor:  # y = base(x)
        return y + self.delta(x).to(y.dtype)

    def delta_weight(self) -> Tensor:
        raise MergeError(f"method '{self.name}' cannot be merged into one weight")

    def merge(self, weight: Tensor) -> Tensor:
        """Pure: the (d_out, d_in) merged matrix for a given base matrix."""
        if not self.mergeable:
            raise MergeError(f"method '{self.name}' is not mergeable: its output depends on the input "
                             "(routing/gating), so it cannot be folded into one weight")
        return weight + self.delta_weight().to(weight.dtype)

    def lowrank(self) -> LowRank | None:
        return None

    def initial_lowrank(self) -> LowRank | None:
        """For base-changing inits (PiSSA, CorDA, ...): the factors the init took out of the base, so that
        ``base + lowrank − initial_lowrank`` is a plain LoRA on the ORIGINAL base (served on a shared base, saved
        with ``as_lora=True``). None: the method does not change the base, or cannot say how."""
        return None

    # --- growing ranks ------------------------------------------------------------------------------------------
    def note_grown(self, param: str, dim: int, start: int, stop: int, *, warmup: int | None = None,
                   weight_decay: float | None = None) -> None:
        """Record that ``param[start:stop]`` along ``dim`` just became new slots (call from a growth step of a
        ``grows_slots`` method): the optimiser treats them as a new parameter group would be treated (fresh AdamW
        moments and step count, lr ramped from 0 over ``warmup`` steps (None: the run's LR warmup), and
        ``weight_decay`` if given (None: the tensor's group's))."""
        if stop > start:
            self.__dict__.setdefault("_grown", []).append(
                GrownSlots(param, dim, int(start), int(stop), None if warmup is None else int(warmup),
                           weight_decay))
            listener = self.__dict__.get("_grown_listener")
            if listener is not None:  # the optimiser's slot hooks take it now, so no pending state outlives a step
                listener(self)

    def take_grown(self) -> list["GrownSlots"]:
        """The slots grown since the last call (and forget them)."""
        return self.__dict__.pop("_grown", [])

    # --- training-time extras ------------------------------------------------------------------------------------
    def extra_loss(self) -> Tensor | None:
        """A regulariser/aux loss for the current step (collected by :func:`lorakit.extra_loss`)."""
        return None

    def stats(self) -> dict[str, float]:
        """Statistics for the metrics log (router load, entropy, current rank, ...)."""
        return {}

    # --- whole-attach hooks: each receives the :class:`lorakit.attachments.Attachment` of one ``attach`` --------
    @classmethod
    def context_keys(cls, cfg: Any) -> tuple[str, ...]:
        """The per-batch context keys this method reads (``self.ctx.get(key)``) under config ``cfg``; ``attach``
        warns when the caller's data never provides one (the mechanism that reads it would silently be off)."""
        return ()

    @classmethod
    def attach_loss(cls, att: Any) -> Tensor | None:
        """The extra loss of ONE attach for the current step, from its active adapters (collected by
        :func:`lorakit.extra_loss`).

        Default: the ``extra_loss()`` of each active adapter reduced by ``loss_reduction``: ``"sum"`` adds them,
        ``"mean"`` divides the sum by the number of adapters that returned a loss (``None`` means "no loss this
        step", e.g. a router that did not run; for a regulariser every module returns one, so this is the module
        count, as KaSA's official ``main.py`` divides by the number of blocks). None if no adapter returned one.
        A method whose loss is one function of all layers (DynMoLE: one load-balancing loss over the routers of
        every layer) overrides this.
        """
        if cls.loss_reduction not in ("sum", "mean"):
            raise ConfigError(f"{cls.__name__}.loss_reduction must be 'sum' or 'mean', got {cls.loss_reduction!r}")
        losses = [x for x in (a.extra_loss() for a in att.active_adapters) if x is not None]
        if not losses:
            return None
        total = losses[0]
        for x in losses[1:]:
            total = total + x
        return total / len(losses) if cls.loss_reduction == "mean" else total

    @classmethod
    def output_loss(cls, att: Any, outputs: Any, batch: Any) -> Tensor | None:
        """A loss on the model's outputs for the current batch (e.g. consistency with the pretrained model), once per
        active attach of this method; collected by :func:`lorakit.output_loss`. Default: none."""
        return None

    @classmethod
    def controller(cls, att: Any) -> Any:
        """A :class:`lorakit.controllers.Controller` this method needs during training, or None. Built once per
        attach (``att.controller()`` caches it)."""
        return None

    # --- state shared by all adapters of one attach (shared random bases, ...) -----------------------------------
    @classmethod
    def share(cls, att: Any) -> None:
        """Called once by ``attach`` after every adapter of the attach is built (before any init and before anything
        is installed): set up state the adapters share (e.g. one frozen random-basis module sized to the largest
        target). Default: nothing."""

    @classmethod
    def shared_to_file(cls, att: Any) -> dict[str, Tensor]:
        """Model-level tensors for the adapter file under their full file keys (PEFT's ``base_model.vera_A``)."""
        return {}

    @classmethod
    def shared_from_file(cls, att: Any, tensors: dict[str, Tensor]) -> set[str]:
        """Take the file tensors that no single adapter claimed (full keys); return the keys used. Runs after
        the per-adapter tensors are validated and before they are set."""
        return set()

    @classmethod
    def check_context(cls, cfg: Any, values: dict) -> None:
        """Validate per-batch context values this method reads (``batch_context``), e.g. task ids < n_tasks;
        raise a :class:`lorakit.errors.ConfigError` naming the problem. Default: nothing to check."""

    @classmethod
    def _check_ids(cls, values: dict, key: str, n: int, what: str) -> None:
        t = values.get(key)
        if t is None:
            return
        t = torch.as_tensor(t)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
            raise ConfigError(f"{cls.name}: batch {key} must lie in [0, {n}) ({what}), got values "
                              f"{sorted(set(t.reshape(-1).tolist()))[:8]}")

    @classmethod
    def bind(cls, att: Any) -> list:
        """Model-level setup, once per attach after every adapter is installed on ``att.model`` (e.g. X-LoRA's
        classifier and two-pass forward): may add state to the adapters and register hooks on the model; returns
        the hooks' handles, which ``detach`` removes (so the model is restored exactly). Default: none."""
        return []

    @classmethod
    def rewritten_paths(cls, att: Any) -> set[str]:
        """Module paths whose weights this attach rewrites beyond its own hosts' outputs while it is attached (S2FT
        co-permutes its targets and their producers): ``attach`` refuses another adapter on them, which would be
        trained on permuted weights and misaligned once they are put back. Default: none."""
        return set()

    # --- file mapping ------------------------------------------------------------------------------------------
    @classmethod
    def file_config(cls, att: Any, conf: dict) -> dict:
        """Adjust the ``adapter_config.json`` about to be written from the trained state (e.g. AdaLoRA's
        ``rank_pattern`` after pruning). Default: unchanged."""
        return conf

    @classmethod
    def from_peft_config(cls, conf: dict, data: dict) -> dict:
        """Adjust the lorakit config ``data`` read from a PEFT ``conf`` (e.g. AdaLoRA's ``rank_pattern``)."""
        return data

    def fit_file(self, tensors: dict[str, Tensor], where: str) -> None:
        """Called by ``load_adapter`` with this module's file tensors (keys relative to the module path; keys of
        nested modules may be present too) before they are checked against the adapter's own: a method whose tensor
        sizes come from the file (a sparse delta's support) adopts them here, and raises
        :class:`lorakit.errors.AdapterFileError` when the file cannot fit this layer. Default: nothing."""

    def fit_state(self, state: dict[str, Tensor]) -> None:
        """Called on resume with this adapter's checkpointed tensors (keys relative to the adapter) before they are
        copied in: a method whose tensor sizes change during training (a sparse support selected mid-run) resizes
        its tensors to them here, keeping the Parameter objects (the optimiser holds them). Default: nothing (a
        size mismatch is then a checkpoint of another configuration)."""

    def to_file(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Internal state -> file tensors (PEFT key names and shapes). Default: rename by ``peft_keys``."""
        ren = self.peft_keys.get(self.view.kind, {})
        return {ren.get(k, k): v for k, v in state.items()}

    def from_file(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        ren = {v: k for k, v in self.peft_keys.get(self.view.kind, {}).items()}
        return {ren.get(k, k): v for k, v in state.items()}

    def extra_repr(self) -> str:
        return f"{self.view.kind} {self.view.d_in}->{self.view.d_out}"


REGISTRY: dict[str, type[Adapter]] = {}


FAST_SERVE = (None, "lowrank", "lowrank+magnitude")


def register(name: str, *, family: str, paper: str, peft: PeftSpec | None = None, fast_serve: str | None = None):
    """Class decorator: ``@register("lora", family="core low-rank", paper="arXiv:2106.09685")``.

    ``peft`` and ``fast_serve`` (see :attr:`Adapter.fast_serve`) are declared per registered class: a subclass
    registered without them does not inherit its parent's."""

    def deco(cls: type[Adapter]) -> type[Adapter]:
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise ValueError(f"method '{name}' registered twice ({REGISTRY[name].__qualname__}, {cls.__qualname__})")
        if cls.Config is None or not dataclasses.is_dataclass(cls.Config):
            raise TypeError(f"{cls.__qualname__} needs a nested @dataclass Config")
        if fast_serve not in FAST_SERVE:
            raise TypeError(f"{cls.__qualname__}: fast_serve={fast_serve!r}; valid: {FAST_SERVE}")
        if fast_serve is not None and not issubclass(cls.Config, LowRankConfig):
            raise TypeError(f"{cls.__qualname__}: fast_serve needs a Config that extends LowRankConfig (the bank "
                            "computes the scale from its r, alpha and rslora)")
        cls.name, cls.family, cls.paper, cls.peft, cls.fast_serve = name, family, paper, peft, fast_serve
        REGISTRY[name] = cls
        return cls

    return deco


def get_method(name: str) -> type[Adapter]:
    import importlib

    importlib.import_module("lorakit.methods")  # registers every method

    if name not in REGISTRY:
        raise ConfigError(f"unknown method '{name}'; registered: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


# ----------------------------------------------------------------------------------------------------------------
# Hosts
# ----------------------------------------------------------------------------------------------------------------
class Adapted(nn.Module):
    """Host: ``y = base_layer(x)``, then each active adapter in order (``y = adapter(x, y)``).

    ``active`` is a tuple of names, so ``forward`` has no data-dependent branches (zero graph breaks).
    While merged, the merged adapters are folded into ``base_layer.weight`` and removed from ``active``;
    the original weight is stashed so unmerging is exact.
    """

    def __init__(self, base_layer: nn.Module, param: str | None = None):
        super().__init__()
        self.base_layer = base_layer
        # a parameter host (PEFT's target_parameters): adapts parameter ``param`` of the module under the chain of
        # hosts (hosts nest, one per parameter, as PEFT's ParamWrapper does); None: a layer host
        self.param = param
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.merged_names: tuple[str, ...] = ()
        self._snapshots: list[tuple[str, Any]] = []
        # tied weights (untie/retie below): where else in the model the base weight Parameter is used (set by attach),
        # and, while the base holds a private copy, the shared Parameter
        self.tied_to: tuple[str, ...] = ()
        self._untied: tuple[Tensor] | None = None
        self._register_load_state_dict_pre_hook(_accept_unwrapped_keys, with_module=True)

    @property
    def weight(self) -> Tensor:  # transformers reads e.g. lm_head.weight / dtype checks through the wrapper
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def __getattr__(self, item: str) -> Any:
        try:
            return super().__getattr__(item)
        except AttributeError:
            if item == "base_layer":
                raise
            return getattr(self.base_layer, item)  # in_features, num_embeddings, padding_idx, ...

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.param is not None:
            return self._patched_forward(x, *args, **kwargs)
        y = self.base_layer(x, *args, **kwargs)
        for name in self.active:
            y = self.adapters[name](x, y)
        return y

    def _patched_forward(self, *args: Any, **kwargs: Any) -> Any:
        """A parameter host: the module runs with ``W' = merge(W)`` of each active adapter in place of its
        parameter (differentiable in the adapter's parameters), and gets its own Parameter back after."""
        if not self.active:
            return self.base_layer(*args, **kwargs)
        owner = param_owner(self.base_layer)
        p = owner._parameters[self.param]
        view = next(iter(self.adapters.values())).view
        m = view.matrix(p)
        for name in self.active:
            m = self.adapters[name].merge(m)
        owner._parameters[self.param] = view.native(m).to(p.dtype)
        try:
            return self.base_layer(*args, **kwargs)
        finally:
            owner._parameters[self.param] = p

    # --- the base weight, layer or parameter ----------------------------------------------------------------------
    def base_weight(self) -> Tensor:
        """The native weight this host adapts (the layer's weight, or the targeted parameter)."""
        if self.param is not None:
            return param_owner(self.base_layer)._parameters[self.param]
        return self.base_layer.weight

    def _get_w(self) -> Tensor:
        return self.base_weight() if self.param is not None else quant.get_weight(self.base_layer)

    @torch.no_grad()
    def _set_w(self, w: Tensor) -> None:
        if self.param is not None:
            p = self.base_weight()
            p.copy_(w.to(p.dtype))
        else:
            quant.set_weight(self.base_layer, w)

    def _snapshot(self) -> Any:
        return self.base_weight().detach().clone() if self.param is not None else quant.snapshot(self.base_layer)

    @torch.no_grad()
    def _restore(self, snap: Any) -> None:
        if self.param is not None:
            self.base_weight().copy_(snap)
        else:
            quant.restore(self.base_layer, snap)

    # --- the base's snapshot stack (exact restores for merges and base-changing inits) ----------------------------
    # ``_snapshots`` holds ``(owner, weight storage before owner changed the base)``, oldest first. Owners are adapter
    # names (residual inits such as PiSSA/CorDA) and MERGE (a merge). Releasing the top entry restores its snapshot
    # bit-exactly; releasing one below takes out only that owner's change and hands its snapshot to the entry above,
    # so the base comes back bit-exactly once every owner is gone, in any order.
    MERGE: ClassVar[str] = "\x00merge"

    def owns_base_change(self, owner: str) -> bool:
        return any(o == owner for o, _ in self._snapshots)

    def base_changed_by_adapter(self) -> bool:
        """Whether an adapter's init wrote a new base weight (a residual init), as opposed to a merge or nothing."""
        return any(o != self.MERGE for o, _ in self._snapshots)

    @torch.no_grad()
    def original_weight(self) -> Tensor:
        """The native weight as it was before any change to the base (residual init, merge), dense fp32: the oldest
        snapshot, else the current weight."""
        return self._dense(self._snapshots[0][1]) if self._snapshots else self._get_w().float()

    @torch.no_grad()
    def change_base(self, owner: str, native_weight: Tensor) -> None:
        """Write a new base weight on behalf of ``owner`` (an adapter name or :attr:`MERGE`)."""
        if not self.owns_base_change(owner):
            if not self._snapshots:
                untie(self)  # a tied base: the change is this module's alone (the last release reties)
            self._snapshots.append((owner, self._snapshot()))
        self._set_w(native_weight)

    @torch.no_grad()
    def release_base(self, owner: str) -> None:
        """Undo ``owner``'s change to the base (nothing if it made none)."""
        idx = next((i for i, (o, _) in enumerate(self._snapshots) if o == owner), None)
        if idx is None:
            return
        if idx == len(self._snapshots) - 1:
            self._restore(self._snapshots.pop()[1])
            if not self._snapshots:
                retie(self)  # every change released: a tied base shares the original Parameter again
            return
        before, after = self._dense(self._snapshots[idx][1]), self._dense(self._snapshots[idx + 1][1])
        w = self._get_w()
        self._set_w((w.float() - (after - before)).to(w.dtype))
        self._snapshots[idx + 1] = (self._snapshots[idx + 1][0], self._snapshots[idx][1])
        del self._snapshots[idx]

    @torch.no_grad()
    def _dense(self, snap: Any) -> Tensor:
        """The fp32 weight a snapshot holds (quantised snapshots are decoded through the layer itself)."""
        if isinstance(snap, Tensor) or self.param is not None:
            return snap.float()
        now = quant.snapshot(self.base_layer)
        quant.restore(self.base_layer, snap)
        try:
            return quant.get_weight(self.base_layer).float().clone()
        finally:
            quant.restore(self.base_layer, now)

    # --- merging (exact: the original weight is a snapshot, never recomputed) ------------------------------------
    @torch.no_grad()
    def merge(self, names: tuple[str, ...]) -> None:
        names = tuple(n for n in names if n not in self.merged_names)
        if not names:
            return
        for n in names:
            a = self.adapters[n]
            if not a.mergeable:
                raise MergeError(f"adapter '{n}' ({a.name}) is not mergeable: its output depends on the input "
                                 "(routing/gating), so it cannot be folded into one weight")
        view = next(iter(self.adapters.values())).view
        w = self._get_w()
        m = view.matrix(w).float()
        for n in names:
            m = self.adapters[n].merge(m)
        self.change_base(self.MERGE, view.native(m).to(w.dtype))  # quantised bases keep their packed storage
        self.merged_names = self.merged_names + names
        self.active = tuple(n for n in self.active if n not in names)

    @torch.no_grad()
    def unmerge(self) -> tuple[str, ...]:
        names = self.merged_names
        self.release_base(self.MERGE)
        self.merged_names = ()
        return names

    def extra_repr(self) -> str:
        return (f"param={self.param!r}, " if self.param is not None else "") + f"active={self.active}" + \
            (f", merged={self.merged_names}" if self.merged_names else "")


def untie(host: Adapted) -> bool:
    """Before the first change to the base of ``host``: if its weight Parameter is tied (shared with other modules,
    ``host.tied_to``, recorded by attach), give the base a private copy, so merges and base-changing inits change
    this module only and every module that shares the weight keeps the original. Returns True if it untied now.

    Semantics (docs/design.md, "Tied weights"): an adapter changes the module it is attached to, never the other
    users of its weight, merged or not; :func:`retie` (when the last change is released) puts the shared Parameter
    object back, so the ties and the values come back exactly."""
    if not host.tied_to or host._untied is not None:
        return False
    base = host.base_layer
    shared = base.weight
    with torch.no_grad():
        base.weight = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)
    host._untied = (shared,)
    return True


def retie(host: Adapted) -> None:
    """Undo :func:`untie`: the base uses the shared Parameter object again."""
    if host._untied is not None:
        host.base_layer.weight = host._untied[0]
        host._untied = None


def _accept_unwrapped_keys(module, state_dict, prefix, *args, **kwargs):
    """Let a plain base checkpoint (``q_proj.weight``) load into a host (``q_proj.base_layer.weight``)."""
    for k in list(state_dict):
        if k.startswith(prefix) and not k.startswith(prefix + "base_layer.") and not k.startswith(prefix + "adapters."):
            rest = k[len(prefix):]
            if "." not in rest:  # weight / bias of the base layer
                state_dict[prefix + "base_layer." + rest] = state_dict.pop(k)


class ModulesToSave(nn.Module):
    """PEFT's ``modules_to_save``: a frozen original plus one trainable copy per adapter name.

    The active adapter's copy is used; with no adapter active, the original. File keys are the original path
    (``score.weight``), as in PEFT.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.copies = nn.ModuleDict()
        self.active: tuple[str, ...] = ()

    def __getattr__(self, item: str) -> Any:
        try:
            return super().__getattr__(item)
        except AttributeError:
            if item == "original_module":
                raise
            return getattr(self.original_module, item)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.active:
            return self.copies[self.active[-1]](*args, **kwargs)
        return self.original_module(*args, **kwargs)


def scale_of(alpha: float, r: int, rslora: bool = False) -> float:
    """LoRA scaling ``α/r`` (rsLoRA: ``α/√r``)."""
    return alpha / (math.sqrt(r) if rslora else r)
