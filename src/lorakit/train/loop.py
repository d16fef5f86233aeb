"""A plain PyTorch training loop that knows nothing about individual methods.

The optimiser comes from the training procedure ``optim.name`` (:mod:`lorakit.procedures`; default adamw).
Per step: ``grad_accum`` micro-batches (forward under autocast, inside ``lorakit.batch_context`` with the batch's
``task_ids`` and a copy of its ``attention_mask`` so routing losses can skip padding; loss = task loss + ``lorakit.extra_loss(model)``), gradient clipping, controllers' ``before_step``,
the procedure's ``before_step``, ``optimizer.step()``, the procedure's ``after_step``, scheduler, controllers'
``step``. Data-dependent inits get calibration batches from the training set. Everything a resume needs (adapter
tensors, optimizer, scheduler, RNG, controllers, the procedure's state) is checkpointed;
the data order is a pure function of (seed, step), so a resumed run repeats the uninterrupted loss curve exactly.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import resource
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import inject
from ..config import AttachConfig
from ..core import get_method
from ..errors import ConfigError, LorakitError
from ..io import save_adapter
from ..procedures import options_dict
from ..procedures import setup as setup_procedure
from ..procedures.slots import set_run_warmup
from ..tasks import get_task
from ..tasks.base import to_device
from .checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import RunConfig, resolve
from . import distributed as dist_
from .loggers import Reporters

log = logging.getLogger(__name__)

__all__ = ["run_training", "Callback", "TrainingError", "NonFiniteLossError", "TrainingInterrupted",
           "lr_lambda", "seed_everything"]


class TrainingError(LorakitError, RuntimeError):
    """Training stopped (the message says why and where the last good checkpoint is)."""


class NonFiniteLossError(TrainingError):
    """The loss or the gradient norm became NaN/inf."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C: a checkpoint was saved (``.checkpoint``); ``--resume`` continues from it."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(f"interrupted at step {step}; checkpoint: {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


class Callback:
    """Observe a run (progress bars, tests). Every hook is optional."""

    def on_train_begin(self, info: dict) -> None: ...
    # the task's rows ({"train": [...], "eval": [...]}); may return replacement rows (a federated client's share)
    def on_rows(self, rows: dict) -> dict | None: ...
    # the adapter is attached, the optimiser not yet built: may load adapter tensors in place or freeze some
    # (a federated round starts from the global adapter), or keep the model and tokenizer to measure them
    # (lorakit.diagnostics); the trainer trains what still requires grad
    def on_attach(self, model, tok=None) -> None: ...
    def on_step(self, step: int, logs: dict) -> None: ...
    def on_eval(self, phase: str, metrics: dict) -> None: ...
    def on_train_end(self, result: dict) -> None: ...


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(total: int, warmup: float, schedule: str, min_ratio: float = 0.0):
    warm = int(round(warmup * total)) if warmup < 1 else int(warmup)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if schedule == "constant":
            return 1.0
        prog = min((step - warm) / max(total - warm, 1), 1.0)
        shape = 0.5 * (1 + math.cos(math.pi * prog)) if schedule == "cosine" else 1.0 - prog
        return min_ratio + (1 - min_ratio) * shape
    return f


def _rss_mb() -> float | None:
    """The resident set size now (Linux), in MB; None where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return None


def _peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


class _Log:
    """metrics.jsonl writer (one JSON object per line, flushed)."""

    def __init__(self, path: Path, keep_until: int | None, reporters=None):
        self.reporters = reporters
        if keep_until is not None and path.is_file():  # resume: drop what came after the checkpoint
            kept = [ln for ln in path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= keep_until
                    and json.loads(ln).get("event") not in ("end", "error", "interrupted")]
            path.write_text("".join(ln + "\n" for ln in kept))
        self.f = path.open("a" if keep_until is not None else "w")

    def __call__(self, **rec) -> None:
        self.f.write(json.dumps(rec, default=float) + "\n")
        self.f.flush()
        if self.reporters is not None:
            self.reporters(rec)

    def close(self) -> None:
        self.f.close()
        if self.reporters is not None:
            self.reporters.close()


def _prepare_out(out: Path, resume: bool) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".lorakit-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output.dir '{out}' is not writable ({e.strerror or e}); choose another with "
                          "output.dir=PATH") from None
    if not resume and (out / "checkpoints").exists():
        log.warning("%s holds an earlier run; starting fresh (its checkpoints are removed)", out)
        shutil.rmtree(out / "checkpoints")


def _batch_indices(i: int, n: int, bs: int, seed: int) -> list[int]:
    """Micro-batch ``i`` of an endless, epoch-wise reshuffled order: a pure function of (i, seed)."""
    per_epoch = max(n // bs, 1)
    epoch, k = divmod(i, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    return perm[k * bs:(k + 1) * bs]


def _dist() -> tuple[int, int]:
    """(rank, world size) when torch.distributed is initialised (data parallel), else (0, 1)."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


class _NoLog:
    def __call__(self, **rec) -> None: ...
    def close(self) -> None: ...


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class _GracefulStop:
    """The first Ctrl-C (SIGINT) only asks the loop to stop at the next step boundary, so the checkpoint never
    holds a half-applied step (parameters updated, step counter not) and a signal landing in a finaliser, where
    Python would swallow the KeyboardInterrupt, is not lost; a second Ctrl-C interrupts at once. Installed only in
    the main thread (signal handlers cannot be set elsewhere); in data-parallel runs the ranks agree on the step.
    Where SIGINT is ignored (a job started with ``&`` from a script, or ``signal.SIG_IGN`` set by the caller) it
    stays ignored, as Python itself does at start-up."""

    def __init__(self):
        self.hits = 0
        self._prev = None
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            try:
                self._prev = signal.signal(signal.SIGINT, self._on_sigint)
            except ValueError:  # not the main interpreter
                self._prev = None

    def _on_sigint(self, signum, frame):
        self.hits += 1
        if self.hits > 1:
            raise KeyboardInterrupt
        sys.stderr.write("\nstopping after this step and saving a checkpoint (Ctrl-C again to stop now)\n")
        sys.stderr.flush()

    def requested(self, world: int = 1, device: torch.device | str = "cpu") -> bool:
        if world > 1:  # on the training device: NCCL reduces CUDA tensors only
            flag = torch.tensor([float(self.hits > 0)], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            return bool(flag.item())
        return self.hits > 0

    def restore(self) -> None:
        if self._prev is not None:
            signal.signal(signal.SIGINT, self._prev)
            self._prev = None


def _validation_loss(task, model, examples, bs, seed, device, bf16, train_batch=None, accum=1):
    """``loss_fn(i, split="validation")``: the task loss (with grad) on validation micro-batch ``i`` of ``examples``
    (an endless, seeded order like the training batches), for procedures that declare ``needs_validation``;
    ``split="train"``: on the first micro-batch of training step ``i`` (Flexora's second-order term)."""

    def loss_fn(i: int, split: str = "validation"):
        if split == "train":
            b = dict(train_batch(i * accum))
        else:
            idx = _batch_indices(i, len(examples), min(bs, len(examples)), seed + 1)
            b = task.collate([examples[j] for j in idx])
        ctx_values = {k: b.pop(k) for k in task.context_keys if k in b}
        if "attention_mask" in b:
            ctx_values.setdefault("attention_mask", b["attention_mask"])
        b = to_device(b, device)
        ctx = inject.batch_context(model, **{k: v.to(device) for k, v in ctx_values.items()}) \
            if ctx_values else contextlib.nullcontext()
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx, autocast:
            return task.forward(model, b)[0]

    return loss_fn


def load_fresh(task, name: str, dtype) -> tuple:
    """``(model, tokenizer)`` from the task's loader, never a cached instance (a task's own ``load_model`` may
    predate the ``cache`` argument)."""
    import inspect

    if "cache" in inspect.signature(task.load_model).parameters:
        return task.load_model(name, dtype, cache=False)
    return task.load_model(name, dtype)


def run_training(config: RunConfig | dict | None = None, *, resume: bool = False,
                 callbacks: list | tuple = ()) -> dict[str, Any]:
    """Train an adapter as ``config`` says; returns the result dict (metrics before/after, trainable params,
    wall time, time/step, tokens/s, peak RSS, loss curve, adapter dir). The arena calls this."""
    cfg = config if isinstance(config, RunConfig) else resolve(base=config or {}) if isinstance(config, dict) \
        else resolve()
    created = dist_.init_process_group(cfg.train.distributed, cfg.train.device)  # torchrun / accelerate launch
    try:
        return _run(cfg, resume, callbacks)
    finally:
        if created and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run(cfg: RunConfig, resume: bool, callbacks) -> dict[str, Any]:
    t_start = time.perf_counter()
    tc, dc = cfg.train, cfg.data
    out = cfg.out_dir
    rank, world = _dist()
    if world > 1 and tc.distributed == "none":
        raise ConfigError(f"torch.distributed runs {world} processes but train.distributed=none: set "
                          "train.distributed=ddp or fsdp")
    if dc.batch_size % world:
        raise ConfigError(f"data.batch_size={dc.batch_size} must be divisible by the {world} data-parallel processes")
    if rank == 0:
        _prepare_out(out, resume)
    if world > 1:
        torch.distributed.barrier()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = dist_.local_device(tc.device) if world > 1 else _device(tc.device)
    cbs = list(callbacks) if rank == 0 else []  # progress and callbacks: rank 0 only

    def emit(hook: str, *args) -> None:
        for cb in cbs:
            fn = getattr(cb, hook, None)
            if fn:
                fn(*args)

    # ---- data and model (data first: bad files fail before the model loads) ------------------------------------
    seed_everything(tc.seed)
    task = get_task(dc.task, dc)
    rows = task.rows()
    for cb in cbs:
        rows = (getattr(cb, "on_rows", None) or (lambda r: None))(rows) or rows
    model_name = task.model_name(cfg.model.name)
    cfg.model.name = model_name
    seed_everything(tc.seed)
    # QLoRA's 4-bit base: quantised as the weights are read where the task can (the float model never exists whole)
    loaded = task.load_quantized(model_name, cfg.model.dtype, dict(cfg.adapter).get("trainable") or None) \
        if cfg.model.quantize == "nf4" else None
    if loaded is None:
        loaded = load_fresh(task, model_name, cfg.model.dtype)
    model, tok = loaded
    model.to(device)
    train_ex, eval_ex = task.encode(rows["train"], tok), task.encode(rows["eval"], tok)
    val_ex: list = []
    probe = cfg.optim.procedure()
    if probe.needs_validation:  # a procedure that trains on validation losses (Flexora): hold out training rows
        n_val = probe.validation_rows(len(train_ex))
        if not 0 < n_val < len(train_ex):
            raise ConfigError(f"optim.name={probe.name} holds out {n_val} of the {len(train_ex)} training examples "
                              "as validation data; it needs at least 1 and must leave some to train on")
        train_ex, val_ex = train_ex[:-n_val], train_ex[-n_val:]
    bs, accum, total = dc.batch_size, tc.grad_accum, tc.steps
    acfg = dict(cfg.adapter)
    for k, v in (getattr(task, "adapter_defaults", lambda m: {})(model)).items():
        if not acfg.get(k):
            acfg[k] = v
    cfg.adapter = AttachConfig.make(acfg).to_dict()
    if cfg.model.quantize == "nf4" and loaded is None:  # QLoRA's 4-bit base: every linear but the head and trained
        from ..quant_model import quantize_model

        quantize_model(model, exclude=cfg.adapter.get("trainable") or None)
    # targets, layer kinds and ranks against this model, now: a wrong target fails before any evaluation runs
    inject.check_attach(model, cfg.adapter)
    if rank == 0:
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    def batch(i: int) -> dict:
        order = getattr(task, "batch_indices", _batch_indices)  # a task may sample its own (e.g. balanced) order
        idx = order(i, len(train_ex), bs, tc.seed)  # the global batch; each process takes its share
        share = max(len(idx) // world, 1)
        return task.collate([train_ex[j] for j in idx[rank * share:(rank + 1) * share] or idx[:1]])

    def global_batch(i: int) -> dict:  # the whole global batch (calibration: every rank computes the same init)
        order = getattr(task, "batch_indices", _batch_indices)
        return task.collate([train_ex[j] for j in order(i, len(train_ex), bs, tc.seed)])

    ckpt = latest_checkpoint(out) if resume else None
    if resume and ckpt is None:
        log.warning("--resume: no checkpoint in %s; starting from scratch", out)
    keep_until = None if ckpt is None else int(ckpt.name.split("-")[1])
    mlog = _Log(out / "metrics.jsonl", keep_until=keep_until,
                reporters=Reporters(tc.report_to, out, cfg.to_dict(), keep_until)
                if set(tc.report_to) - {"jsonl"} else None) if rank == 0 else _NoLog()
    info = {"task": task.name, "model": model_name, "method": acfg.get("method"), "device": str(device),
            "train_rows": len(train_ex), "eval_rows": len(eval_ex), "steps": total, "output_dir": str(out)}
    if world > 1:
        info.update(distributed=tc.distributed, world_size=world)
    try:
        return _train(cfg, task, model, tok, train_ex, eval_ex, batch, ckpt, mlog, emit, info, device, out,
                      t_start, global_batch, val_ex)
    finally:
        mlog.close()


def _train(cfg, task, model, tok, train_ex, eval_ex, batch, ckpt, mlog, emit, info, device, out, t_start,
           global_batch=None, val_ex=()):
    tc, dc, oc = cfg.train, cfg.data, cfg.optim
    total, accum = tc.steps, tc.grad_accum
    rank, world = _dist()
    sharded = world > 1 and tc.distributed == "fsdp"
    if tc.distributed == "fsdp" and not sharded:
        log.warning("train.distributed=fsdp in a single process: training unsharded")

    def evaluate(phase: str, step: int) -> dict:
        if world > 1 and not sharded:  # ddp: rank 0 evaluates, the others take its numbers
            box = [task.evaluate(model, tok, eval_ex, dc.eval_batch_size) if rank == 0 else None]
            torch.distributed.broadcast_object_list(box, src=0)
            m = box[0]
        else:  # one process, or fsdp: every rank runs the same (collective) forwards and gets the same numbers
            m = task.evaluate(model, tok, eval_ex, dc.eval_batch_size)
        mlog(event="eval", phase=phase, step=step, **m)
        emit("on_eval", phase, m)
        return m

    before = evaluate("before", 0) if (tc.eval_before and ckpt is None) else {}

    # ---- adapter (calibration batches from the training set when the method initialises from data) ----------
    method = get_method(cfg.adapter["method"])
    calib = None
    if inject.calibration_kind(cfg.adapter):
        calib = [to_device({k: v for k, v in (global_batch or batch)(i).items() if k not in task.context_keys},
                           device)  # the global batches on every rank: the same init everywhere (no adapters)
                 for i in range(max(tc.calibration_batches, 1))]
    seed_everything(tc.seed)
    inject.attach(model, cfg.adapter, calibration=calib, loss_fn=task.loss if calib is not None else None,
                  provides=task.context_keys)
    emit("on_attach", model, tok)  # federated rounds load the global adapter; diagnostics keep the model
    if cfg.model.gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise ConfigError("model.gradient_checkpointing=true needs a Hugging Face model")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
    proc = oc.procedure()  # how the parameters train (optim.name): groups, optimiser, per-step hooks, state
    tparams, opt = setup_procedure(model, proc)
    if proc.needs_validation:
        proc.set_validation(_validation_loss(task, model, val_ex, dc.batch_size, tc.seed, device,
                                             tc.precision == "bf16", batch, accum))
        info["validation_rows"] = len(val_ex)
    params = [t.param for t in tparams]
    n_train = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    if sharded:  # FSDP2: the frozen base sharded over the ranks, the adapters replicated (train/distributed.py)
        dist_.shard_model(model, device)
        info.update(params_this_rank=dist_.local_numel(model))  # what this rank holds (the base: about 1/world)
        from .. import assets

        assets.clear_model_cache()  # the process-wide pristine copy would keep a whole model on every rank
        import gc

        gc.collect()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, oc.warmup, oc.schedule, oc.min_lr_ratio))
    set_run_warmup(opt, int(round(oc.warmup * total)) if oc.warmup < 1 else int(oc.warmup))  # grown rank slots
    ctrls = inject.controllers(model)
    for c in ctrls:
        c.on_train_begin(model, opt, total)
    proc.on_train_begin(model, opt, total)
    proc_id = {"name": proc.name, "options": options_dict(proc)}

    step, loss_curve = 0, []
    if ckpt is not None:
        st = load_checkpoint(ckpt, model)
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        for c, s in zip(ctrls, st.get("controllers", [])):
            c.load_state_dict(s)
        saved = st.get("procedure") or {"name": "adamw", "options": {}, "state": {}}  # older checkpoints: adamw
        if (saved["name"], saved["options"]) != (proc_id["name"], proc_id["options"]):
            raise ConfigError(f"checkpoint {ckpt} was written with optim.name={saved['name']} {saved['options']}, "
                              f"this run has optim.name={proc.name} {proc_id['options']}; resume with the same "
                              "procedure and options, or start a new run")
        proc.load_state_dict(saved["state"])
        step, loss_curve, before = st["step"], list(st["loss_curve"]), st.get("metrics_before", {})
        set_rng_state(st["rng"])
        log.info("resumed from %s (step %d)", ckpt, step)
    info.update(trainable_params=n_train, total_params=n_total, start_step=step)
    mlog(event="start", step=step, **info)
    emit("on_train_begin", info)

    use_bf16 = tc.precision == "bf16"
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    snap = rng_state()  # RNG at the start of the next step (what a checkpoint must restore)
    last_ckpt = ckpt

    def state() -> dict:
        return {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": snap,
                "controllers": [c.state_dict() for c in ctrls], "procedure": {**proc_id, "state": proc.state_dict()},
                "loss_curve": loss_curve,
                "metrics_before": before}

    train_time, tokens, first_step = 0.0, 0, step
    model.train()
    stop = _GracefulStop()
    try:
        while step < total:
            if stop.requested(world, device):  # Ctrl-C: leave between steps, so the checkpoint is a consistent state
                raise KeyboardInterrupt
            t0 = time.perf_counter()
            proc.before_forward(step, model, opt)
            loss_sum, ntok = 0.0, 0
            for k in range(accum):
                b = batch(step * accum + k)
                ctx_values = {k: b.pop(k) for k in task.context_keys if k in b}
                if "attention_mask" in b:  # shared, not popped: routing losses skip padding (MeteoRA, LLaVA-MoLE)
                    ctx_values.setdefault("attention_mask", b["attention_mask"])
                ntok += int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                b = to_device(b, device)
                ctx = inject.batch_context(model, **{k: v.to(device) for k, v in ctx_values.items()}) \
                    if ctx_values else contextlib.nullcontext()
                with ctx, autocast():
                    loss, outputs = task.forward(model, b)
                    full = loss
                    for extra in (inject.extra_loss(model), inject.output_loss(model, outputs, b)):
                        if extra is not None:
                            full = full + extra
                    del outputs
                if not torch.isfinite(full.detach()):
                    raise NonFiniteLossError(
                        f"the loss became {float(full.detach())} at step {step + 1} (micro-batch {k + 1}); training stopped. "
                        f"Last good checkpoint: {last_ckpt or 'none (set train.save_every)'}. Try a lower optim.lr, "
                        "optim.max_grad_norm, or train.precision=fp32.")
                (full / accum).backward()
                loss_sum += float(loss.detach()) / accum
            if world > 1:  # data parallel: average gradients, loss and count tokens over the processes
                dist_.average_gradients(params, world)
                dist_.sum_buffers(model, world)  # per-step statistics the controllers read (SMoRA's loads)
                red = torch.tensor([loss_sum, float(ntok)], dtype=torch.float64, device=device)
                torch.distributed.all_reduce(red)
                loss_sum, ntok = float(red[0]) / world, int(red[1])
            if oc.max_grad_norm:
                gn = float(torch.nn.utils.clip_grad_norm_(params, oc.max_grad_norm))
            else:
                gn = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
            if not math.isfinite(gn):
                raise NonFiniteLossError(f"the gradient norm became {gn} at step {step + 1}; training stopped. "
                                         f"Last good checkpoint: {last_ckpt or 'none'}. Try a lower optim.lr.")
            for c in ctrls:
                c.before_step(step, model, opt)
            proc.before_step(step, model, opt)
            lr = opt.param_groups[0]["lr"]
            opt.step()
            proc.after_step(step, model, opt)
            sched.step()
            for c in ctrls:
                c.step(step, model, opt)
            opt.zero_grad(set_to_none=True)
            step += 1
            snap = rng_state()
            dt = time.perf_counter() - t0
            train_time += dt
            tokens += ntok
            loss_curve.append(loss_sum)
            logs = {"loss": loss_sum, "lr": lr, "grad_norm": gn, "step_time_s": dt, "tokens_per_s": ntok / dt}
            logs.update({f"adapter/{k}": v for k, v in inject.adapter_stats(model).items()})
            logs.update(getattr(task, "step_metrics", dict)())
            logs.update({f"procedure/{k}": v for k, v in proc.step_metrics().items()})
            if tc.log_every and (step % tc.log_every == 0 or step == total):
                mlog(event="train", step=step, **logs)
            emit("on_step", step, logs)
            if tc.eval_every and step % tc.eval_every == 0 and step < total:
                evaluate(f"step-{step}", step)
                model.train()
            if tc.save_every and step % tc.save_every == 0:
                last_ckpt = save_checkpoint(out, step, model, state(), tc.keep_checkpoints) if rank == 0 else None
    except KeyboardInterrupt:
        stop.restore()
        opt.zero_grad(set_to_none=True)
        path = save_checkpoint(out, step, model, state(), tc.keep_checkpoints) if rank == 0 else None
        mlog(event="interrupted", step=step, checkpoint=str(path))
        log.warning("interrupted at step %d; checkpoint saved to %s", step, path)
        raise TrainingInterrupted(step, path) from None
    except NonFiniteLossError as e:
        mlog(event="error", step=step, message=str(e))
        raise
    finally:
        stop.restore()

    rss_train = _rss_mb()  # after the last step, before the final evaluation
    model.eval()
    after = evaluate("after", step)
    adapter_dir = None
    if cfg.output.save_adapter and rank == 0:
        adapter_dir = str(save_adapter(model, out / "adapter"))
    n_steps = step - first_step
    result = {
        **info, "status": "completed", "steps": step, "metrics_before": before, "metrics_after": after,
        "wall_time_s": time.perf_counter() - t_start, "train_time_s": train_time,
        "time_per_step_s": train_time / max(n_steps, 1), "tokens_per_s": tokens / max(train_time, 1e-9),
        "peak_rss_mb": _peak_rss_mb(), "rss_after_train_mb": rss_train, "loss_curve": loss_curve, "adapter_dir": adapter_dir,
        "output_dir": str(out), "config": cfg.to_dict(),
    }
    mlog(event="end", step=step, **{k: v for k, v in result.items() if k not in ("loss_curve", "config")})
    if rank == 0:
        (out / "result.json").write_text(json.dumps(result, indent=2, default=float))
    emit("on_train_end", result)
    return result
