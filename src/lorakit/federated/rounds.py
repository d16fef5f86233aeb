"""One federated round on each side, without Flower: the server's global adapter (:class:`ServerSession`) and a
client's local training (:func:`client_round`, which runs ``lorakit train``'s own loop,
:func:`lorakit.train.loop.run_training`, from the global adapter on the client's share of the data).

The global state is split by what trains on the clients:

* ``sent``: the adapter tensors the clients train (after the strategy froze its ``frozen_roles``); they go down
  and up every round and are what the strategy aggregates;
* ``frozen``: everything else the adapter owns (FFA-LoRA's A, LoRA-SB's B and A buffers): sent to a client once,
  with its first round, and kept in the client's Flower ``Context.state``.
"""
from __future__ import annotations

import copy
import hashlib
import logging
from pathlib import Path

import torch
from torch import Tensor

from .. import inject
from ..config import AttachConfig
from ..errors import ConfigError
from ..procedures.base import trainable_parameters
from .config import FederatedConfig
from .split import dirichlet_split
from .strategies import STRATEGIES, Pair

log = logging.getLogger(__name__)

__all__ = ["ServerSession", "client_round", "digest", "nbytes", "freeze_roles", "client_rows"]


def digest(state: dict[str, Tensor]) -> str:
    """A hash of tensors (names, shapes, dtypes and bytes): equal digests = bit-identical tensors."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().contiguous().cpu()
        h.update(f"{k}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def nbytes(state: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def freeze_roles(model, roles: tuple[str, ...]) -> list[str]:
    """Turn off ``requires_grad`` of the adapter parameters of these roles; returns their names."""
    out = []
    for t in trainable_parameters(model):
        if t.role in roles:
            t.param.requires_grad_(False)
            out.append(t.name)
    return out


def _pairs(model) -> list[Pair]:
    found: dict[tuple, dict[str, str]] = {}
    for t in trainable_parameters(model):
        if t.role in ("A", "B") and t.param.dim() == 2:
            found.setdefault((t.adapter_name, t.path), {})[t.role] = t.name
    return [Pair(A=d["A"], B=d["B"]) for d in found.values() if set(d) == {"A", "B"}]


def _load(model, state: dict[str, Tensor]) -> None:
    own = model.state_dict(keep_vars=True)
    bad = [k for k, v in state.items() if k not in own or tuple(own[k].shape) != tuple(v.shape)]
    if bad:
        raise ConfigError(f"the global adapter does not fit this client's model (tensor {bad[0]!r}): do the server "
                          "and the clients run the same config?")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def client_rows(fc: FederatedConfig, rows: dict, cid: int) -> dict:
    """Client ``cid``'s Dirichlet share of the training rows and the first ``client_eval_rows`` eval rows."""
    labels = [r["label"] for r in rows["train"]]
    parts = dirichlet_split(labels, fc.fed.clients, fc.fed.alpha, fc.fed.split_seed, min_rows=1)
    if not 0 <= cid < len(parts):
        raise ConfigError(f"partition-id {cid} is outside 0..{len(parts) - 1} (federated.clients={fc.fed.clients})")
    return {"train": [rows["train"][i] for i in parts[cid]], "eval": rows["eval"][:fc.fed.client_eval_rows]}


class ServerSession:
    """The server's copy of the model with the global adapter: its initial state (the same attach as ``lorakit
    train``, seeded; data-dependent inits calibrate on the training set), what is sent and what is frozen, the
    (A, B) pairs, central evaluation and the final PEFT file."""

    def __init__(self, fc: FederatedConfig):
        from ..tasks import get_task
        from ..train.checkpoint import adapter_tensors
        from ..train.loop import _batch_indices, seed_everything
        from ..tasks.base import to_device

        self.fc = fc
        run = copy.deepcopy(fc.run)
        tc, dc = run.train, run.data
        if tc.threads:
            torch.set_num_threads(tc.threads)
        seed_everything(tc.seed)
        self.task = task = get_task(dc.task, dc)
        rows = task.rows()
        self.train_labels = [r["label"] for r in rows["train"]]
        name = task.model_name(run.model.name)
        seed_everything(tc.seed)
        self.model, self.tok = task.load_model(name, run.model.dtype)
        train_ex = task.encode(rows["train"], self.tok)
        self.eval_ex = task.encode(rows["eval"], self.tok)
        acfg = dict(run.adapter)
        for k, v in (getattr(task, "adapter_defaults", lambda m: {})(self.model)).items():
            if not acfg.get(k):
                acfg[k] = v
        acfg = AttachConfig.make(acfg).to_dict()
        if run.model.quantize == "nf4":
            from ..quant_model import quantize_model

            quantize_model(self.model, exclude=acfg.get("trainable") or None)
        inject.check_attach(self.model, acfg)
        calib = None
        if inject.calibration_kind(acfg):
            calib = [to_device({k: v for k, v in task.collate(
                [train_ex[j] for j in _batch_indices(i, len(train_ex), dc.batch_size, tc.seed)]).items()
                if k not in task.context_keys}, "cpu") for i in range(max(tc.calibration_batches, 1))]
        seed_everything(tc.seed)
        inject.attach(self.model, acfg, calibration=calib, loss_fn=task.loss if calib is not None else None,
                      provides=task.context_keys)
        strat = STRATEGIES[fc.fed.strategy]
        self.pairs = _pairs(self.model)
        freeze_roles(self.model, strat.frozen_roles)
        trained = trainable_parameters(self.model)
        roles = {t.role for t in trained}
        if strat.only_roles is not None and not roles <= set(strat.only_roles):
            raise ConfigError(f"federated.strategy={strat.name} averages only {strat.only_roles}; this adapter "
                              f"trains {sorted(roles)}")
        if strat.pairs and not self.pairs:
            raise ConfigError(f"federated.strategy={strat.name} needs 2-D (A, B) factor pairs; this adapter has none")
        self.sent_keys = [t.name for t in trained]
        state = adapter_tensors(self.model)
        self.sent = {k: state[k] for k in self.sent_keys}
        self.frozen = {k: v for k, v in state.items() if k not in self.sent}
        self.model.eval()

    def set(self, sent: dict[str, Tensor]) -> None:
        _load(self.model, sent)
        self.sent = {k: v.detach().clone() for k, v in sent.items()}

    def evaluate(self) -> dict:
        return self.task.evaluate(self.model, self.tok, self.eval_ex, self.fc.run.data.eval_batch_size)

    def save(self, directory) -> Path:
        from ..io import save_adapter

        return save_adapter(self.model, directory)


class _Round:
    """The trainer callbacks of one client round: its rows, the global adapter in, the trained tensors out."""

    def __init__(self, fc: FederatedConfig, cid: int, start: dict[str, Tensor]):
        self.fc, self.cid, self.start = fc, cid, start
        self.model, self.n_train, self.sent, self.frozen_digest = None, 0, None, None
        self.dp, self.rnd = None, 0

    def on_rows(self, rows):
        out = client_rows(self.fc, rows, self.cid)
        self.n_train = len(out["train"])
        return out

    def on_attach(self, model, tok=None):
        self.model = model
        _load(model, self.start)
        freeze_roles(model, STRATEGIES[self.fc.fed.strategy].frozen_roles)
        f = self.fc.fed
        if f.dp:  # DP-SGD on what still trains: the factor (and a head), one example per micro-batch
            from .dp import DPSGD

            gen = torch.Generator().manual_seed(self.fc.run.train.seed * 1_000_003 + 7919 * self.rnd + self.cid)
            self.dp = DPSGD([t.param for t in trainable_parameters(model)], batch=self.fc.run.data.batch_size,
                            clip=f.dp_clip, noise=f.dp_noise, generator=gen)

    def on_train_end(self, result):
        names = [t.name for t in trainable_parameters(self.model)]
        sd = self.model.state_dict()
        self.sent = {k: sd[k].detach().clone().cpu() for k in names}
        self.frozen_digest = digest({k: v for k, v in sd.items() if k in self.start and k not in self.sent})
        if self.dp is not None:
            self.dp.remove()


def client_round(fc: FederatedConfig, cid: int, rnd: int, start: dict[str, Tensor], workdir) -> tuple[dict, dict]:
    """Client ``cid``'s round ``rnd``: ``local_steps`` of ``lorakit train`` from ``start`` (the full global adapter)
    on its Dirichlet share. Returns the trained tensors and metrics (rows, loss, the frozen tensors' digest,
    (ε, δ) under DP)."""
    from ..train.loop import run_training

    run = copy.deepcopy(fc.run)
    run.train.steps = fc.fed.local_steps
    run.train.seed = fc.run.train.seed + 1000 * rnd + cid  # a new data order every round and client
    run.train.eval_before, run.train.eval_every, run.train.save_every = False, 0, 0
    run.train.report_to = ["jsonl"]
    run.train.calibration_batches = 1  # a data-dependent init is replaced by the global adapter at once
    run.output.dir = str(Path(workdir) / f"client-{cid}" / f"round-{rnd}")
    run.output.save_adapter = False
    if fc.fed.dp:  # per-example gradients: micro-batches of one example, the clipping is DP-SGD's own
        run.train.grad_accum, run.data.batch_size = fc.run.data.batch_size, 1
        run.optim.max_grad_norm = None
    cb = _Round(fc, cid, start)
    cb.rnd = rnd
    res = run_training(run, callbacks=[cb])
    metrics = {"num-examples": cb.n_train, "train_loss": float(sum(res["loss_curve"]) / max(len(res["loss_curve"]), 1)),
               "eval_accuracy": float(res["metrics_after"].get("accuracy", float("nan")))}
    if fc.fed.dp:
        from .dp import epsilon

        f, b = fc.fed, fc.run.data.batch_size
        metrics.update(dp_epsilon=epsilon(f.dp_noise, b / cb.n_train, rnd * f.local_steps, f.dp_delta)
                       if f.dp_noise > 0 else float("inf"), dp_delta=f.dp_delta,
                       dp_clipped_share=sum(n > f.dp_clip for n in cb.dp.norms) / max(len(cb.dp.norms), 1))
    return cb.sent, {**metrics, "frozen_digest": cb.frozen_digest}


def run_inprocess(fc: FederatedConfig, workdir=None) -> dict:
    """The same rounds as the Flower app, driven in this process without Flower (no network, no Ray): every
    client of every round runs :func:`client_round`, one after another, and the server aggregates with the same
    strategy. For benchmarks on a machine where Ray's workers are unwelcome (its memory monitor kills them when
    *other* processes fill the node) and for debugging. Bytes are the payloads (no Flower serialisation), so
    ``wire_bytes_*`` are absent. Returns the dict ``federated.json`` holds."""
    import json
    import tempfile
    import time

    from .strategies import aggregate

    t0 = time.time()
    out = Path(fc.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sess = ServerSession(fc)
    evals = {"0": sess.evaluate()}
    history, initialised = [], set()

    def write(complete: bool, adapter: str | None = None) -> dict:
        result = {"strategy": fc.fed.strategy, "engine": "inprocess", "clients": fc.fed.clients,
                  "rounds": fc.fed.rounds, "local_steps": fc.fed.local_steps, "alpha": fc.fed.alpha,
                  "split_seed": fc.fed.split_seed, "method": fc.run.adapter.get("method"),
                  "task": fc.run.data.task, "sent_tensors": len(sess.sent),
                  "sent_numel": sum(v.numel() for v in sess.sent.values()),
                  "frozen_numel": sum(v.numel() for v in sess.frozen.values()), "eval": evals,
                  "history": history, "adapter_dir": adapter, "wall_time_s": time.time() - t0,
                  "complete": complete, "config": fc.to_dict()}
        tmpf = out / "federated.json.tmp"
        tmpf.write_text(json.dumps(result, indent=2, default=float))
        tmpf.replace(out / "federated.json")
        return result
    k = fc.fed.clients
    rng = torch.Generator().manual_seed(fc.fed.split_seed)
    with tempfile.TemporaryDirectory(prefix="lorakit-fed-") as tmp:
        work = Path(workdir or tmp)
        for rnd in range(1, fc.fed.rounds + 1):
            t1 = time.time()
            size = max(1, round(k * fc.fed.fraction))
            cids = sorted(torch.randperm(k, generator=rng)[:size].tolist()) if size < k else list(range(k))
            start = {**sess.sent, **sess.frozen}
            down = sum(nbytes(sess.sent) + (nbytes(sess.frozen) if c not in initialised else 0) for c in cids)
            outs = [client_round(fc, c, rnd, start, work) for c in cids]
            initialised.update(cids)
            states, mets = [o[0] for o in outs], [o[1] for o in outs]
            weights = [float(m["num-examples"]) for m in mets]
            new, diag = aggregate(fc.fed.strategy, states, weights, sess.pairs, vars(fc.fed))
            sess.set(new)
            up = sum(nbytes(s) for s in states)
            rec = {"round": rnd, "clients": len(cids), "bytes_down": down, "replies": len(cids), "failed": 0,
                   "bytes_up": up, "bytes_up_per_client": up / len(cids), "weights": weights,
                   "client_train_loss": [m["train_loss"] for m in mets],
                   "frozen_digests": [m["frozen_digest"] for m in mets], **diag}
            if "dp_epsilon" in mets[0]:
                rec.update(dp_epsilon=max(m["dp_epsilon"] for m in mets), dp_delta=mets[0]["dp_delta"])
            if fc.fed.eval_every_round or rnd == fc.fed.rounds:
                evals[str(rnd)] = sess.evaluate()
            rec["round_time_s"] = time.time() - t1
            history.append(rec)
            log.info("round %d/%d: %s", rnd, fc.fed.rounds, evals.get(str(rnd)))
            write(False)  # partial results survive an interrupted run ("complete": false)
    adapter = str(sess.save(out / "adapter"))
    return write(True, adapter)
