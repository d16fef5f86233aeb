"""Data-parallel and sharded training for ``lorakit train`` under ``torchrun`` / ``accelerate launch``.

``train.distributed`` selects the mode (validated when the config is resolved):

* ``none``: one process. Launched by torchrun with more than one process, the run is refused (N identical runs
  would write one output directory).
* ``ddp``: every rank holds the whole model; each takes a disjoint slice of every global batch, and after the
  ``grad_accum`` micro-batches the trainable gradients are averaged with one all-reduce over a flat buffer.
* ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``): the frozen base parameters are sharded over the ranks
  (one FSDP unit per transformer block, from the model's ``_no_split_modules``, plus the root), gathered block by
  block for the forward and backward and freed again. The adapters' tensors (and any trainable base parameter:
  ``adapter.trainable`` copies, trained biases) are *not* sharded (``ignored_params``): they are replicated and
  their gradients averaged as under ``ddp``.

Choices, and why:

* **The adapters stay replicated under FSDP2.** They are 0.1-1 % of the model, so sharding them saves little
  memory, while replicated ordinary tensors let everything that works on a whole adapter run unchanged on every
  rank: controllers that rank or prune over all modules (AdaLoRA's budget, IncreLoRA's growth), procedures that
  transform gradients, ``stats()``, checkpoints and the PEFT writer. Rank 0 therefore holds the full adapter
  without a gather and writes it. What cannot work is a method whose adapter reads or writes the *base weight
  outside the base layer's forward* during training (the base is then a local shard): such a method declares
  :attr:`lorakit.core.Adapter.fsdp_unsupported` with the reason, and ``train.distributed=fsdp`` refuses it at
  config resolution.
* **The gradient average is one all-reduce after the accumulation window, not torch's DDP reducer.** It is what
  DDP computes with ``no_sync`` over the window, but it follows the parameter set of each step: controllers change
  ``requires_grad`` during a run (LaMDA's freezing), routed mixtures leave experts without a gradient on some ranks
  (a presence flag is reduced with the gradients, so a parameter no rank touched keeps ``grad=None``, as in one
  process). What it gives up is overlapping the communication with the backward, which for an adapter-sized
  gradient is small.
* **Evaluation**: under ``fsdp`` every rank runs the whole evaluation (an FSDP forward is a collective, so every
  rank must run the same forwards); the ranks compute the same numbers and rank 0 logs them. Under ``ddp`` rank 0
  evaluates alone and broadcasts the metrics while the others wait (the group lorakit creates has a 2-hour
  timeout for that wait). Logging, progress, checkpoints and the adapter file: rank 0.
"""
from __future__ import annotations

import datetime
import logging
import os
from typing import Iterable

import torch
from torch import nn

from ..errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["MODES", "launched_world", "check_config", "init_process_group", "rank_world", "shard_model",
           "average_gradients", "sharded_units", "local_numel", "local_device", "sum_buffers"]

MODES = ("none", "ddp", "fsdp")


def launched_world() -> int:
    """The number of processes a launcher (torchrun, accelerate launch) started, from ``WORLD_SIZE``; 1 if none."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def check_config(cfg) -> None:
    """Resolve-time checks of ``train.distributed`` against the launch and the method (before any model loads)."""
    mode = cfg.train.distributed
    world = launched_world()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
    if mode == "none":
        if world > 1:
            raise ConfigError(f"this process is one of {world} started by a launcher (WORLD_SIZE={world}) but "
                              "train.distributed=none: set train.distributed=ddp or train.distributed=fsdp, or "
                              "start a single process")
        return
    if not torch.distributed.is_available():
        raise ConfigError(f"train.distributed={mode} needs a torch build with torch.distributed")
    if cfg.data.batch_size % world:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is the global micro-batch and must be divisible by "
                          f"the {world} processes (each takes batch_size/{world} rows)")
    if mode == "fsdp":
        from ..core import get_method

        method = get_method(cfg.adapter.get("method", "lora"))
        why = method.fsdp_unsupported
        if why:
            raise ConfigError(f"adapter.method={method.name} cannot train with train.distributed=fsdp: {why}. "
                              "Use train.distributed=ddp (the base is then replicated on every rank)")


def init_process_group(mode: str, device: str) -> bool:
    """Join the launcher's process group (``env://``: torchrun / accelerate set RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT). NCCL on CUDA, gloo otherwise. Returns True when this call created the group (the caller then
    destroys it at the end); False when there is nothing to do (mode none, no launcher, or already joined)."""
    d = torch.distributed
    if mode == "none" or not d.is_available() or d.is_initialized() or "RANK" not in os.environ \
            or "WORLD_SIZE" not in os.environ:
        return False
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # under ddp the other ranks wait in a broadcast while rank 0 evaluates (GSM8K generation can take long):
    # a generous timeout instead of NCCL's 10 minutes
    d.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    return True


def local_device(name: str) -> torch.device:
    """``train.device`` for this rank: ``auto``/``cuda`` under a launcher map to ``cuda:LOCAL_RANK``."""
    if name in ("auto", "cuda") and torch.cuda.is_available():
        if "LOCAL_RANK" in os.environ:
            return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        return torch.device("cuda")
    if name == "auto":
        return torch.device("cpu")
    return torch.device(name)


def _adapter_params(model: nn.Module) -> set[nn.Parameter]:
    """Every parameter lorakit attached (adapters, trainable copies, method-level modules) or that trains."""
    from ..core import Adapter, ModulesToSave

    keep: set[nn.Parameter] = {p for p in model.parameters() if p.requires_grad}
    for m in model.modules():
        if isinstance(m, Adapter):
            keep.update(m.parameters())
        elif isinstance(m, ModulesToSave):
            for c in m.copies.values():
                keep.update(c.parameters())
    return keep


def sharded_units(model: nn.Module) -> list[nn.Module]:
    """The modules that become FSDP units before the root: the transformer blocks the model names in
    ``_no_split_modules`` (Hugging Face models), outermost first; none for other models (then the root is one unit:
    the base is still sharded, but gathered whole for each forward)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    units, seen = [], set()
    for path, m in model.named_modules():
        if m is model or type(m).__name__ not in names:
            continue
        if any(path.startswith(p + ".") for p in seen):  # nested inside a unit already
            continue
        seen.add(path)
        units.append(m)
    return units


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Apply FSDP2 to ``model`` in place (blocks, then the root); adapter and trainable parameters stay replicated
    plain tensors. Returns the model (its class becomes an ``FSDPModule`` subclass; module paths are unchanged)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    _, world = rank_world()
    mesh = init_device_mesh(device.type, (world,))
    ignored = _adapter_params(model)
    for unit in sharded_units(model):
        fully_shard(unit, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    return model


def sum_buffers(model: nn.Module, world: int) -> None:
    """All-reduce (sum) every adapter buffer its class lists in ``summed_buffers``: statistics a forward adds up
    over the step's rows, which each rank only saw its share of."""
    from ..core import Adapter

    if world <= 1:
        return
    bufs = [getattr(m, n) for m in model.modules() if isinstance(m, Adapter) for n in type(m).summed_buffers
            if isinstance(getattr(m, n, None), torch.Tensor)]
    if not bufs:
        return
    flat = torch.cat([b.reshape(-1).double() for b in bufs])
    torch.distributed.all_reduce(flat)
    off = 0
    with torch.no_grad():
        for b in bufs:
            b.copy_(flat[off:off + b.numel()].view_as(b).to(b.dtype))
            off += b.numel()


def local_numel(model: nn.Module) -> int:
    """Parameter elements this rank holds (a sharded parameter counts its local shard)."""
    from torch.distributed.tensor import DTensor

    return sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())


def average_gradients(params: Iterable[torch.Tensor], world: int) -> None:
    """Average the gradients of ``params`` over the ranks with one all-reduce of a flat buffer. A parameter
    without a gradient on a rank contributes zeros; one without a gradient on every rank keeps ``grad=None``
    (as in one process: an optimiser skips it)."""
    params = list(params)
    if world <= 1 or not params:
        return
    sizes = [p.numel() for p in params]
    dtype = torch.float32 if all(p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params) \
        else torch.float64
    dev = params[0].device
    flat = torch.zeros(sum(sizes) + len(params), dtype=dtype, device=dev)
    off = 0
    for i, (p, n) in enumerate(zip(params, sizes)):
        if p.grad is not None:
            flat[off:off + n].copy_(p.grad.reshape(-1))
            flat[sum(sizes) + i] = 1.0  # presence flag
        off += n
    torch.distributed.all_reduce(flat)
    flags = flat[sum(sizes):]
    off = 0
    for i, (p, n) in enumerate(zip(params, sizes)):
        if flags[i] > 0:
            g = (flat[off:off + n] / world).view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        off += n
