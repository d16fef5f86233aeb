"""ICM-LoRA: in-context meta LoRA generation (Shao et al. 2025, "In-Context Meta LoRA Generation", arXiv:2501.17635;
official code YihuaJerry/ICM-LoRA).

A conditional VAE learns the distribution of trained adapters (e.g. checkpoints along training runs of several
tasks) given a *task condition*, and generates a new adapter for a task from its condition alone, with no training.

* **Flatten / unflatten** (:func:`flatten_adapter`, :func:`unflatten_adapter`): an adapter's tensors in sorted key
  order as one float64 vector plus its layout (key, shape, dtype); ``unflatten(flatten(sd)) == sd`` exactly (every
  float16/bfloat16/float32 value is a float64 value).
* **Normalisation** (:class:`Normalizer`): per-position mean and standard deviation over the training adapters (the
  official ``normalizeLoraWeight``); ``decode(encode(v)) == v`` up to rounding.
* **Task condition** (:func:`task_condition`): the model's last-layer hidden state at the last token of an
  in-context prompt made of the task's examples (the official ``last_time_step_icl``), without adapters.
* **CVAE** (:class:`AdapterCVAE`): encoder = a Conv1d stack (kernel 7, stride 2, as the official design, with
  ``levels`` chosen for the vector length) over the normalised vector, then ``[h; c] -> (μ, log σ²)``; decoder =
  ``[z; c] ->`` the mirrored ConvTranspose1d stack. Loss ``MSE(x̂, x) + kld_weight·KL`` (official 0.005).
* **Generation** (:func:`generate_adapter`): ``z ~ N(0, I)`` (or the mean ``z = 0``), decode with the condition,
  de-normalise, unflatten, and write a loadable adapter (the training adapters' config) with
  :func:`lorakit.save_adapter`'s writer.

Decisions: the official encoder has 12 levels for a 1.9 M-long vector; lorakit sizes the stack to the vector
(``levels`` = as many stride-2 halvings as keep ≥ 8 positions, at most 12) and pads the vector to a multiple of
``2**levels``; the condition is used as given (the official projects a 512-d condition: pass ``condition_dim``).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, LorakitError

__all__ = ["Layout", "flatten_adapter", "unflatten_adapter", "Normalizer", "task_condition", "AdapterCVAE",
           "train_cvae", "generate_adapter", "generate_vector", "adapter_vector"]


@dataclass(frozen=True)
class Layout:
    """The order, shapes and dtypes of a flattened adapter (keys sorted)."""

    entries: tuple[tuple[str, tuple[int, ...], str], ...]

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for _, s, _ in self.entries)


def flatten_adapter(sd: dict[str, Tensor]) -> tuple[Tensor, Layout]:
    """``(vector float64, layout)`` of an adapter state dict, keys in sorted order."""
    if not sd:
        raise LorakitError("flatten_adapter: the adapter has no tensors")
    keys = sorted(sd)
    for k in keys:
        if not sd[k].is_floating_point():
            raise LorakitError(f"flatten_adapter: '{k}' is {sd[k].dtype}; only floating-point tensors flatten")
    vec = torch.cat([sd[k].detach().cpu().reshape(-1).to(torch.float64) for k in keys])
    return vec, Layout(tuple((k, tuple(sd[k].shape), str(sd[k].dtype).replace("torch.", "")) for k in keys))


def unflatten_adapter(vec: Tensor, layout: Layout) -> dict[str, Tensor]:
    if vec.dim() != 1 or vec.numel() != layout.numel:
        raise LorakitError(f"unflatten_adapter: the vector has {tuple(vec.shape)} entries, the layout needs "
                           f"({layout.numel},)")
    out, i = {}, 0
    for k, shape, dtype in layout.entries:
        n = math.prod(shape)
        out[k] = vec[i:i + n].reshape(shape).to(getattr(torch, dtype)).clone()
        i += n
    return out


class Normalizer:
    """Per-position standardisation over a set of flattened adapters (σ floored at ``eps``)."""

    def __init__(self, mean: Tensor, std: Tensor):
        self.mean, self.std = mean, std

    @classmethod
    def fit(cls, vectors: Tensor, eps: float = 1e-8) -> "Normalizer":
        v = vectors.to(torch.float64)
        return cls(v.mean(0), v.std(0, unbiased=False).clamp_min(eps))

    def encode(self, v: Tensor) -> Tensor:
        return ((v.to(torch.float64) - self.mean) / self.std).float()

    def decode(self, v: Tensor) -> Tensor:
        return v.to(torch.float64) * self.std + self.mean


@torch.no_grad()
def task_condition(model: nn.Module, tok, examples: list[str], template: str = "{examples}") -> Tensor:
    """The last-layer hidden state (float32, (hidden,)) at the last token of the in-context prompt of
    ``examples``, read with every adapter switched off."""
    from .inject import disabled

    if not examples:
        raise ConfigError("task_condition: give at least one in-context example of the task")
    prompt = template.format(examples="\n\n".join(examples))
    ids = tok(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    was = model.training
    model.eval()
    try:
        with disabled(model):
            out = model(input_ids=ids, output_hidden_states=True)
    finally:
        model.train(was)
    return out.hidden_states[-1][0, -1].float().cpu()


class AdapterCVAE(nn.Module):
    """Conditional VAE over normalised adapter vectors of length ``length``."""

    def __init__(self, length: int, condition_dim: int, latent_dim: int = 32, channels: int = 16,
                 levels: int | None = None, kernel_size: int = 7):
        super().__init__()
        if length < 8 or condition_dim < 1 or latent_dim < 1:
            raise ConfigError(f"AdapterCVAE: length={length} (>= 8), condition_dim={condition_dim} and "
                              f"latent_dim={latent_dim} (>= 1)")
        if levels is None:
            levels = max(1, min(12, int(math.log2(length / 8))))
        self.length, self.levels, self.channels = length, levels, channels
        self.padded = math.ceil(length / 2 ** levels) * 2 ** levels
        self.bottom = self.padded // 2 ** levels
        pad = kernel_size // 2
        enc, ch = [], 1
        for _ in range(levels):
            enc += [nn.Conv1d(ch, channels, kernel_size, stride=2, padding=pad), nn.LeakyReLU(0.2)]
            ch = channels
        self.encoder = nn.Sequential(*enc)
        flat = channels * self.bottom
        self.to_stats = nn.Linear(flat + condition_dim, 2 * latent_dim)
        self.from_latent = nn.Linear(latent_dim + condition_dim, flat)
        dec = []
        for i in range(levels):
            last = i == levels - 1
            dec += [nn.ConvTranspose1d(channels, 1 if last else channels, kernel_size, stride=2, padding=pad,
                                       output_padding=1)]
            if not last:
                dec.append(nn.LeakyReLU(0.2))
        self.decoder = nn.Sequential(*dec)
        self.latent_dim = latent_dim

    def _pad(self, x: Tensor) -> Tensor:
        return F.pad(x, (0, self.padded - self.length))

    def encode(self, x: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(self._pad(x)[:, None]).flatten(1)
        mu, logvar = self.to_stats(torch.cat([h, c], 1)).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: Tensor, c: Tensor) -> Tensor:
        h = self.from_latent(torch.cat([z, c], 1)).view(-1, self.channels, self.bottom)
        return self.decoder(h)[:, 0, : self.length]

    def forward(self, x: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(x, c)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z, c), mu, logvar

    @staticmethod
    def loss(x: Tensor, recon: Tensor, mu: Tensor, logvar: Tensor, kld_weight: float = 0.005) -> Tensor:
        kld = -0.5 * torch.mean(torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1))
        return F.mse_loss(recon, x) + kld_weight * kld


def train_cvae(vectors: Tensor, conditions: Tensor, *, epochs: int = 200, lr: float = 1e-3, latent_dim: int = 32,
               kld_weight: float = 0.005, batch_size: int = 16, seed: int = 0, **kw
               ) -> tuple[AdapterCVAE, Normalizer, list[float]]:
    """Fit the normaliser and a CVAE on ``vectors`` (n, length) with ``conditions`` (n, condition_dim)."""
    if vectors.dim() != 2 or conditions.dim() != 2 or vectors.shape[0] != conditions.shape[0]:
        raise ConfigError(f"train_cvae: vectors {tuple(vectors.shape)} and conditions {tuple(conditions.shape)} "
                          "must be (n, length) and (n, condition_dim)")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        norm = Normalizer.fit(vectors)
        x = norm.encode(vectors)
        c = conditions.float()
        model = AdapterCVAE(x.shape[1], c.shape[1], latent_dim=latent_dim, **kw)
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        losses = []
        for _ in range(epochs):
            perm = torch.randperm(x.shape[0], generator=g)
            tot = 0.0
            for i in range(0, x.shape[0], batch_size):
                idx = perm[i:i + batch_size]
                recon, mu, logvar = model(x[idx], c[idx])
                loss = model.loss(x[idx], recon, mu, logvar, kld_weight)
                opt.zero_grad()
                loss.backward()
                opt.step()
                tot += float(loss.detach()) * len(idx)
            losses.append(tot / x.shape[0])
    return model.eval(), norm, losses


@torch.no_grad()
def generate_vector(model: AdapterCVAE, norm: Normalizer, condition: Tensor, *, sample: bool = False,
                    seed: int = 0) -> Tensor:
    c = condition.float().reshape(1, -1)
    z = torch.randn(1, model.latent_dim, generator=torch.Generator().manual_seed(seed)) if sample else \
        torch.zeros(1, model.latent_dim)
    return norm.decode(model.decode(z, c)[0])


def generate_adapter(model: AdapterCVAE, norm: Normalizer, condition: Tensor, layout: Layout,
                     template_dir: str | os.PathLike, out_dir: str | os.PathLike, *, sample: bool = False,
                     seed: int = 0) -> Path:
    """Generate an adapter for ``condition`` and write it as ``out_dir`` with the config of ``template_dir`` (one
    of the training adapters): a directory ``lorakit.load_adapter`` loads."""
    from .formats.peft import read_adapter_config, write_adapter_dir

    conf = read_adapter_config(template_dir)
    sd = unflatten_adapter(generate_vector(model, norm, condition, sample=sample, seed=seed), layout)
    return Path(write_adapter_dir(out_dir, conf, sd))


def adapter_vector(directory: str | os.PathLike) -> tuple[Tensor, Layout]:
    """Flatten the tensors of an adapter directory (PEFT format) as they are in the file."""
    from .formats.peft import read_tensors

    return flatten_adapter(read_tensors(directory))
