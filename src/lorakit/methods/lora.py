"""LoRA and rsLoRA.

LoRA (Hu et al. 2021, arXiv:2106.09685): ``h = W0 x + s · B A dropout(x)``, ``s = α/r``.
rsLoRA (Kalajdzievski 2023, arXiv:2312.03732): the same with ``s = α/√r``.

Shapes: ``A`` (r, d_in), ``B`` (d_out, r). Trainable: A, B (and ``lora_B.bias`` with ``lora_bias``). Init as
loralib/PEFT: ``A ~ kaiming_uniform(a=√5)``, ``B = 0`` (so ΔW = 0); embeddings swap the roles (A = 0, B ~ N(0,1))
as PEFT does; ``init="gaussian"`` draws A ~ N(0, 1/r). Merge: ``W + s·BA``.

PEFT's other initialisations (``init_lora_weights``), as ``init`` options (declared in ``LoRA.inits``; linear and
Conv1D layers; files say ``init_lora_weights`` as PEFT does and load both ways):

* ``"olora"`` (Büyükakyüz 2024, arXiv:2406.01775): ``W = QR`` (reduced QR of the fp32 (d_out, d_in) matrix),
  ``B = Q[:, :r]``, ``A = R[:r]``, base ``W − s·BA`` (pushed on the host's snapshot stack: detach is bit-exact).
  Identical to PEFT's ``olora_init``. Loading an OLoRA file rebuilds that residual from the given base, as PEFT does.
* ``"orthogonal"``: ``Q`` = QR of an r×r normal draw; ``A = (N(0,1)^{d_in×r/2} Q_odd)ᵀ/10``,
  ``B = N(0,1)^{d_out×r/2}... Q_even/10`` (r even). The random draws follow PEFT's order, including the kaiming
  draws PEFT's ``nn.Linear`` factors make before it, so a seeded attach gives PEFT's factors. ΔW ≠ 0 at init.
* ``"loftq"`` (Li et al. 2023, arXiv:2310.08659): alternate ``Q = deq(quant(W − s·BA))`` and the top-r SVD of
  ``W − Q`` (``loftq_iter`` rounds; ``loftq_bits`` 4 = NF4 blocks of 64 as bitsandbytes' ``Params4bit``, 8 = row-wise
  int8 as ``Int8Params``); the base becomes the dequantised ``Q``. Decision: PEFT writes ``A = R``, ``B = L``
  (``W − Q ≈ LR``) whatever the scale, so its initial model is ``Q + s·LR``; lorakit divides both by ``√s`` so
  ``Q + s·BA ≈ W`` for every ``alpha``/``r`` (equal to PEFT when ``s = 1``, the LoftQ setting). The base ``Q`` (what a
  loaded file needs) is the same either way. No bitsandbytes needed (lorakit's own NF4, bit-equal to it).
* ``"eva"`` (Paischer et al. 2024, arXiv:2410.07170): data-driven through the calibration path (``activations``):
  ``A`` = the top-r principal directions of the layer inputs (eigenvectors of the centred input covariance), ``B = 0``.
  Decision: one exact eigendecomposition of the full calibration covariance instead of PEFT's randomised incremental
  PCA with early stopping, and no rank redistribution (PEFT's ``rho = 1``); PEFT files with EVA's per-module ranks
  (``rank_pattern``) load as any LoRA.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..core import Adapter, Factor, LowRank, LowRankConfig, PeftSpec, register, scale_of
from ..errors import ConfigError


_LORA_FIELDS = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "rslora": "use_rslora"}
_LORA_DEFAULTS = {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "use_rslora": False}


def lora_spec(fixed: dict, load_match: dict, **extra_fields: str) -> PeftSpec:
    """PEFT's LoraConfig mapping shared by every method stored as peft_type LORA (LoRA, DoRA, PiSSA, ...)."""
    fields = {**_LORA_FIELDS, **extra_fields}
    defaults = {**_LORA_DEFAULTS, **({"lora_bias": False} if "lora_bias" in extra_fields else {})}
    return PeftSpec("LORA", fields, fixed=fixed, load_match=load_match, defaults=defaults)


@register("lora", family="core low-rank", paper="Hu et al. 2021, LoRA, arXiv:2106.09685",
          peft=lora_spec({"use_dora": False, "init_lora_weights": True},
                         {"use_dora": lambda v: not v,
                          "init_lora_weights": lambda v: v in (None, True, False, "gaussian", "olora",
                                                               "orthogonal", "loftq", "eva")},
                         lora_bias="lora_bias"),
          fast_serve="lowrank")
class LoRA(Adapter):
    __doc__ = __doc__

    @dataclass
    class Config(LowRankConfig):
        lora_bias: bool = False
        # "default" (kaiming A, zero B) | "gaussian" | PEFT's "olora", "orthogonal", "loftq", "eva" (see LoRA.inits)
        init: Literal["default", "gaussian", "olora", "orthogonal", "loftq", "eva"] = "default"
        loftq_bits: int = 4  # init="loftq": 4 (NF4) or 8 (int8)
        loftq_iter: int = 1  # init="loftq": alternating rounds

    # init option -> (what attach does to the output, calibration data it needs): Adapter.init_of reads it
    inits = {"default": ("noop", None), "gaussian": ("noop", None), "olora": ("residual", None),
             "orthogonal": ("changes", None), "loftq": ("changes", None), "eva": ("noop", "activations")}
    _BASE_CHANGING = ("olora", "loftq")  # inits that write a new base (host snapshot stack)
    _PEFT_INIT = {"default": True}  # init option -> PEFT's init_lora_weights (the others: the same string)

    roles = {"lora_A.weight": "A", "lora_B.weight": "B"}
    layers = ("linear", "conv1d", "embedding", "conv2d", "param")
    peft_keys = {"embedding": {"lora_A.weight": "lora_embedding_A", "lora_B.weight": "lora_embedding_B"}}

    def __init__(self, base: nn.Module, cfg: Config, view=None):
        super().__init__(base, cfg, view)
        if cfg.r <= 0:
            raise ConfigError(f"r must be positive, got {cfg.r}")
        v = self.view
        conv = v.kind == "conv2d"
        if v.kind == "param":  # a targeted parameter (PEFT's ParamWrapper): one rank-r factor pair per expert
            if cfg.dropout or cfg.lora_bias:
                raise ConfigError(f"{self.name} on a parameter target ('{v.param}') cannot use dropout or lora_bias "
                                  "(the delta is a weight patch, as in PEFT's ParamWrapper)")
            self.lora_A = Factor(cfg.r * v.experts, v.d_in)
            self.lora_B = Factor(v.d_out, cfg.r * v.experts)
        else:
            self.lora_A = Factor(cfg.r, *v.in_shape) if conv else Factor(cfg.r, v.d_in)
            self.lora_B = Factor(v.d_out, cfg.r, 1, 1) if conv else Factor(v.d_out, cfg.r)
        if cfg.lora_bias:
            self.lora_B.bias = nn.Parameter(torch.zeros(v.d_out))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.scale = scale_of(cfg.alpha, cfg.r, cfg.rslora)
        init = getattr(cfg, "init", "default")
        if init not in ("default", "gaussian") and init not in type(self).own_inits():
            raise ConfigError(f"{self.name}: init={init!r}; valid: {sorted(type(self).own_inits() or ['default', 'gaussian'])}")
        if init not in ("default", "gaussian"):
            if v.kind not in ("linear", "conv1d"):
                raise ConfigError(f"{self.name}: init={init!r} works on linear and Conv1D layers, not {v.kind}; "
                                  "exclude that module or use init='default'")
            if cfg.lora_bias and init in self._BASE_CHANGING:
                raise ConfigError(f"{self.name}: init={init!r} with lora_bias=True is not supported (as in PEFT)")
        if init == "orthogonal" and cfg.r % 2:
            raise ConfigError(f"{self.name}: init='orthogonal' needs an even rank r, got {cfg.r}")
        if init in ("olora", "loftq", "eva") and cfg.r > min(v.d_in, v.d_out):
            raise ConfigError(f"{self.name}: init={init!r} needs r <= min(d_in, d_out) = {min(v.d_in, v.d_out)}, "
                              f"got r={cfg.r}")
        if init == "loftq" and (cfg.loftq_bits not in (4, 8) or cfg.loftq_iter < 1):
            raise ConfigError(f"{self.name}: init='loftq' needs loftq_bits 4 or 8 and loftq_iter >= 1, got "
                              f"loftq_bits={cfg.loftq_bits}, loftq_iter={cfg.loftq_iter}")

    @property
    def A(self) -> Tensor:  # (r, d_in)
        return self.lora_A.weight.flatten(1)

    @property
    def B(self) -> Tensor:  # (d_out, r)
        return self.lora_B.weight.flatten(1)

    def _init_option(self) -> str:
        """The ``init`` option when this class declares LoRA's inits ("default" otherwise)."""
        init = getattr(self.cfg, "init", "default")
        return init if init in type(self).own_inits() or init == "gaussian" else "default"

    def reset_parameters(self) -> None:
        init = self._init_option()
        if self.view.kind == "embedding":
            nn.init.zeros_(self.lora_A.weight)
            nn.init.normal_(self.lora_B.weight)
        elif init == "orthogonal":
            self._orthogonal()
        else:
            if init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1 / self.cfg.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        if self.cfg.lora_bias:
            nn.init.zeros_(self.lora_B.bias)

    @torch.no_grad()
    def _orthogonal(self) -> None:
        """PEFT's ``orthogonal_init``, drawing in PEFT's order (its two ``nn.Linear`` factors are built, with
        kaiming draws, before it runs), so a seeded attach gives PEFT's factors."""
        A, B, r = self.lora_A.weight, self.lora_B.weight, self.cfg.r
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(B, a=math.sqrt(5))  # only to consume the draw PEFT's lora_B construction makes
        Q, _ = torch.linalg.qr(torch.randn(r, r))
        a = torch.randn(self.view.d_in, r // 2).mm(Q[0::2, :]).T / 10.0
        b = torch.randn(r // 2, self.view.d_out).T.mm(Q[1::2, :]) / 10.0
        A.copy_(a)
        B.copy_(b)

    @torch.no_grad()
    def init_from(self, weight: Tensor, stats=None) -> Tensor | None:
        init = self._init_option()
        A, B = self.lora_A.weight, self.lora_B.weight
        if init == "olora":
            Q, R = torch.linalg.qr(weight.float())
            B.copy_(Q[:, : self.cfg.r])
            A.copy_(R[: self.cfg.r])
            self._initial = (A.detach().clone(), B.detach().clone())  # for initial_lowrank (not saved)
            return weight - self.scale * (B.float() @ A.float())
        if init == "loftq":
            from ._loftq import loftq

            Q, L, R = loftq(weight, self.cfg.r, self.cfg.loftq_bits, self.cfg.loftq_iter)
            root = math.sqrt(self.scale)
            B.copy_(L / root)
            A.copy_(R / root)
            return Q
        if init == "eva":
            if not stats or "cov" not in stats:
                raise ConfigError(f"{self.name}: init='eva' needs activation statistics of this module's inputs "
                                  "(pass calibration=<batches> to attach)")
            mu = stats["x_mean"].float()
            cov = stats["cov"].float() - mu[:, None] * mu[None, :]
            _, vecs = torch.linalg.eigh(cov.double())
            top = vecs[:, -self.cfg.r:].flip(1).t()  # (r, d_in), largest variance first
            A.copy_(top.to(A.dtype))
            B.zero_()
        return None

    def on_load(self, weight: Tensor, state: dict[str, Tensor]) -> Tensor | None:
        """OLoRA/LoftQ files hold the factors; the base they were trained on is rebuilt from the given base, as PEFT
        does on loading (the file's factors then replace the initial ones)."""
        if self._init_option() in self._BASE_CHANGING:
            return self.init_from(weight, None)
        return super().on_load(weight, state)

    @classmethod
    def changes_base(cls, cfg) -> bool:
        init = getattr(cfg, "init", "default")
        return (init in cls._BASE_CHANGING and init in cls.own_inits()) or super().changes_base(cfg)

    def initial_lowrank(self) -> LowRank | None:
        """The initial factors of a residual init (the base is ``W − s·B₀A₀``), so a server can apply the adapter
        to the original base as the exact rank-2r LoRA ``[B | −B₀][A; A₀]``. OLoRA only: LoftQ's base is a
        quantisation of W, which no LoRA on the original base reproduces (None: callers refuse with their reason)."""
        if self._init_option() == "olora" and getattr(self, "_initial", None) is not None:
            return LowRank(*self._initial, self.scale)
        return None

    @classmethod
    def file_config(cls, att, conf: dict) -> dict:
        """PEFT's ``init_lora_weights`` (and ``loftq_config``) from the ``init`` option."""
        if conf.get("peft_type") != "LORA" or not cls.own_inits():
            return conf
        cfg = att.method_config() if att is not None else None
        init = getattr(cfg, "init", "default")
        conf = dict(conf)
        conf["init_lora_weights"] = cls._PEFT_INIT.get(init, init)
        if init == "loftq":
            conf["loftq_config"] = {"loftq_bits": cfg.loftq_bits, "loftq_iter": cfg.loftq_iter}
        return conf

    @classmethod
    def from_peft_config(cls, conf: dict, data: dict) -> dict:
        v = conf.get("init_lora_weights")
        if isinstance(v, str) and v in cls.own_inits() and v != "default":
            data = dict(data, init=v)
            if v == "loftq":
                lq = conf.get("loftq_config") or {}
                data.update(loftq_bits=lq.get("loftq_bits", 4), loftq_iter=lq.get("loftq_iter", 1))
        return data

    def delta(self, x: Tensor) -> Tensor:
        h = self.view.down(self.dropout(self.cast_in(x)), self.A)
        s = self.scale
        out = self.view.up(h * (s.to(h.dtype) if isinstance(s, Tensor) else s), self.B)
        if self.cfg.lora_bias:
            b = self.lora_B.bias
            out = out + (b.view(1, -1, 1, 1) if self.view.kind == "conv2d" else b)
        return out

    fuse_down = True  # lorakit.fusion: x·[A_q; A_k; A_v]ᵀ in one GEMM at inference

    @classmethod
    def share(cls, att) -> None:
        """Group the attach's linear/Conv1D adapters by parent module for the fused inference down-projection."""
        super().share(att)
        if not cls.fuse_down:
            return
        from ..fusion import group_by_parent

        ms = [(m.path, m.adapter) for m in att.members
              if m.param is None and m.adapter.view.kind in ("linear", "conv1d") and not m.adapter.cfg.lora_bias]
        for g in group_by_parent(ms):
            for a in g.members:
                a.__dict__["_fuse"] = g

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if self.view.kind in ("linear", "conv1d") and not self.cfg.lora_bias and y.dtype == self.lora_A.weight.dtype:
            # fused: one GEMM with accumulate into y (no extra pass over the (…, d_out) output)
            fuse = self.__dict__.get("_fuse")
            if fuse is not None and not torch.is_grad_enabled() and (not self.training or self.cfg.dropout == 0) \
                    and not torch.compiler.is_compiling():
                h = fuse.down(self, x)  # shared with the siblings reading the same x (lorakit.fusion)
            else:
                h = nn.functional.linear(self.dropout(x), self.lora_A.weight)
            y2 = y.reshape(-1, y.shape[-1])
            if isinstance(self.scale, Tensor):  # lorakit.prepare_for_hotswap: the scale is data, not a constant
                h = h * self.scale.to(h.dtype)
                return torch.addmm(y2, h.reshape(-1, h.shape[-1]), self.lora_B.weight.t()).view_as(y)
            if not torch.is_grad_enabled() and y2.data_ptr() == y.data_ptr() and y.is_contiguous():
                # inference: accumulate into the base output in place (no new (…, d_out) tensor)
                return y2.addmm_(h.reshape(-1, h.shape[-1]), self.lora_B.weight.t(), alpha=self.scale).view_as(y)
            return torch.addmm(y2, h.reshape(-1, h.shape[-1]), self.lora_B.weight.t(), alpha=self.scale).view_as(y)
        return y + self.delta(x).to(y.dtype)

    def to_file(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        # factors zero-padded by lorakit.prepare_for_hotswap / hotswap are written at the adapter's own rank cfg.r
        if self.__dict__.get("padded_rank"):
            state = dict(state)
            for k, dim in (("lora_A.weight", 0), ("lora_B.weight", 1)):
                if k in state and state[k].shape[dim] > self.cfg.r:
                    state[k] = state[k].narrow(dim, 0, self.cfg.r)
        return super().to_file(state)

    def delta_weight(self) -> Tensor:
        if self.cfg.lora_bias:
            from ..errors import MergeError

            raise MergeError("a LoRA with lora_bias=True adds a bias and cannot be merged into the weight alone")
        v = self.view
        if v.kind == "param" and v.ndim == 3:
            # PEFT's expert layout: A rows are (expert, rank) expert-major, B columns (rank, expert) rank-major
            A = self.lora_A.weight.reshape(v.experts, self.cfg.r, v.d_in)
            B = self.lora_B.weight.reshape(v.d_out, self.cfg.r, v.experts)
            return torch.einsum("ore,eri->eoi", B, A) * self.scale  # (E, d_out, d_in)
        return (self.B @ self.A) * self.scale

    def lowrank(self) -> LowRank:
        if self.view.kind == "param" and self.view.ndim == 3:
            from ..errors import MergeError

            raise MergeError(f"the LoRA on the fused expert parameter '{self.view.param}' is one low-rank update per "
                             "expert, not one (A, B) pair; merge it (lorakit.merge_and_unload) to serve it")
        s = float(self.scale) if isinstance(self.scale, Tensor) else self.scale
        if self.__dict__.get("padded_rank"):  # hot-swapping: the own rank, without the zero padding
            r = self.cfg.r
            return LowRank(self.A[:r], self.B[:, :r], s)
        return LowRank(self.A, self.B, s)
