"""The Flower app: a ServerApp driving :class:`LorakitStrategy` and a ClientApp running :func:`client_round`.

Importing this module imports Flower (``pip install 'lorakit[federated]'``); :mod:`lorakit.federated` imports it
lazily. The lorakit config travels as JSON: in the simulation engine inside the apps (closures), in the deployment
engine as the run config key ``lorakit-config`` (``flwr run ... --run-config``). Each SuperNode's partition is its
node config ``partition-id`` (set by the simulation engine, and by ``flower-supernode --node-config`` when
deployed).

Message contents (RecordDict keys): down ``arrays`` (the sent tensors of the global adapter), ``frozen`` (the
frozen tensors, only in a node's first round), ``config`` (``server-round``); up ``arrays`` (the trained
tensors), ``metrics`` (``num-examples``, ``train_loss``, ``eval_accuracy``), ``info`` (``frozen_digest``).
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from .config import FederatedConfig, resolve_federated
from .rounds import ServerSession, client_round, nbytes
from .strategies import STRATEGIES, aggregate

log = logging.getLogger(__name__)

__all__ = ["LorakitStrategy", "build_apps", "server_app", "client_app", "config_from_json"]


def config_from_json(text: str) -> FederatedConfig:
    from .engines import decode_config

    return resolve_federated(base=json.loads(decode_config(text)))


def _torch(rec: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in rec.to_torch_state_dict().items()}


def _record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().contiguous().cpu() for k, v in state.items()})


class LorakitStrategy(Strategy):
    """Flower strategy for one lorakit adapter: sends the global adapter's trained tensors (and, to a node's first
    round, the frozen ones), aggregates replies with ``federated.strategy`` (:func:`aggregate`, weights = the
    clients' training rows), records per round the bytes each way, the aggregation error and the frozen tensors'
    digests. Evaluation is central (the server's ``evaluate_fn``); ``configure_evaluate`` sends nothing."""

    def __init__(self, fc: FederatedConfig, session: ServerSession):
        self.fc, self.session = fc, session
        self.initialised: set[int] = set()
        self.history: list[dict] = []
        self._round: dict = {}

    def summary(self) -> None:
        s = STRATEGIES[self.fc.fed.strategy]
        log.info("lorakit strategy %s (%s): K=%d, %d rounds x %d local steps, sent %d tensors (%d bytes), frozen "
                 "%d tensors", s.name, s.paper, self.fc.fed.clients, self.fc.fed.rounds, self.fc.fed.local_steps,
                 len(self.session.sent), nbytes(self.session.sent), len(self.session.frozen))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        k = self.fc.fed.clients
        size = max(1, round(k * self.fc.fed.fraction))
        node_ids, _ = sample_nodes(grid, k, size)
        config["server-round"] = server_round
        msgs, down, wire = [], 0, 0
        frozen = _record(self.session.frozen) if self.session.frozen else None
        for nid in node_ids:
            content = RecordDict({"arrays": arrays, "config": config})
            down += nbytes(self.session.sent)
            wire += arrays.count_bytes()
            if nid not in self.initialised and frozen is not None:
                content["frozen"] = frozen
                down += nbytes(self.session.frozen)
                wire += frozen.count_bytes()
            msgs.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=nid))
        self._round = {"round": server_round, "clients": len(node_ids), "bytes_down": down,
                       "wire_bytes_down": wire, "t0": time.time()}
        self._sent_to = set(node_ids)
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        states, weights, up, wire, mets, digests, failed = [], [], 0, 0, [], [], 0
        for msg in replies:
            if msg.has_error():
                failed += 1
                log.warning("round %d: a client failed: %s", server_round, msg.error.reason)
                continue
            rec = msg.content["arrays"]
            wire += rec.count_bytes()
            states.append(_torch(rec))
            up += nbytes(states[-1])
            m = dict(msg.content["metrics"])
            mets.append(m)
            weights.append(float(m["num-examples"]))
            digests.append(str(msg.content["info"]["frozen_digest"]))
            self.initialised.add(msg.metadata.src_node_id)
        if not states:
            raise RuntimeError(f"round {server_round}: every client failed ({failed})")
        new, diag = aggregate(self.fc.fed.strategy, states, weights, self.session.pairs, vars(self.fc.fed))
        self.session.set(new)
        rec = {**self._round, "replies": len(states), "failed": failed, "bytes_up": up,
               "bytes_up_per_client": up / len(states), "wire_bytes_up": wire, "weights": weights,
               "client_train_loss": [m["train_loss"] for m in mets],
               "frozen_digests": digests, **diag,
               **({"dp_epsilon": max(m["dp_epsilon"] for m in mets), "dp_delta": mets[0]["dp_delta"]}
                  if "dp_epsilon" in mets[0] else {}), "round_time_s": time.time() - self._round.pop("t0")}
        rec.pop("t0", None)
        self.history.append(rec)
        metrics = MetricRecord({"train_loss": sum(w * m["train_loss"] for w, m in zip(weights, mets)) / sum(weights),
                                "bytes_up": up, "bytes_down": rec["bytes_down"],
                                "agg_error": float(diag["agg_error"])})
        return _record(new), metrics

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []

    def aggregate_evaluate(self, server_round, replies):
        return None


def _serve(grid: Grid, fc: FederatedConfig) -> dict:
    """The ServerApp's work: initial adapter, the rounds, central evaluation, the final PEFT adapter and
    ``federated.json`` in ``output.dir``."""
    out = Path(fc.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    session = ServerSession(fc)
    strategy = LorakitStrategy(fc, session)
    evals: dict[int, dict] = {}

    def evaluate_fn(rnd: int, arrays: ArrayRecord):
        if not (fc.fed.eval_every_round or rnd in (0, fc.fed.rounds)):
            return None
        m = session.evaluate()
        evals[rnd] = m
        return MetricRecord({k: float(v) for k, v in m.items() if isinstance(v, (int, float))})

    strategy.start(grid=grid, initial_arrays=_record(session.sent), num_rounds=fc.fed.rounds,
                   timeout=fc.fed.timeout_s, evaluate_fn=evaluate_fn)
    adapter = session.save(out / "adapter")
    result = {"strategy": fc.fed.strategy, "engine": fc.fed.engine, "clients": fc.fed.clients,
              "rounds": fc.fed.rounds, "local_steps": fc.fed.local_steps, "alpha": fc.fed.alpha,
              "split_seed": fc.fed.split_seed, "method": fc.run.adapter.get("method"), "task": fc.run.data.task,
              "sent_tensors": len(session.sent), "sent_numel": sum(v.numel() for v in session.sent.values()),
              "frozen_numel": sum(v.numel() for v in session.frozen.values()),
              "eval": {str(k): v for k, v in sorted(evals.items())}, "history": strategy.history,
              "adapter_dir": str(adapter), "wall_time_s": time.time() - t0, "config": fc.to_dict()}
    tmp = out / "federated.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=float))
    tmp.replace(out / "federated.json")
    return result


def build_apps(config_json: str | None = None) -> tuple[ServerApp, ClientApp]:
    """The ServerApp and ClientApp. ``config_json``: the resolved lorakit config (simulation); None: read it from
    the run config key ``lorakit-config`` (deployment)."""
    sapp, capp = ServerApp(), ClientApp()

    def cfg_of(context: Context) -> FederatedConfig:
        text = config_json or context.run_config.get("lorakit-config")
        if not text:
            raise RuntimeError("no lorakit config: run with --run-config lorakit-config=<json> (lorakit federate "
                               "does this)")
        return config_from_json(str(text))

    @sapp.main()
    def main(grid: Grid, context: Context) -> None:
        _serve(grid, cfg_of(context))

    @capp.train()
    def train(msg: Message, context: Context) -> Message:
        fc = cfg_of(context)
        cid = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["server-round"])
        if "frozen" in msg.content:
            context.state["lorakit-frozen"] = msg.content["frozen"]
        start = _torch(msg.content["arrays"])
        if "lorakit-frozen" in context.state:
            start.update(_torch(context.state["lorakit-frozen"]))
        with tempfile.TemporaryDirectory(prefix=f"lorakit-fed-{cid}-") as work:
            sent, metrics = client_round(fc, cid, rnd, start, work)
        digest = metrics.pop("frozen_digest")
        content = RecordDict({"arrays": _record(sent), "metrics": MetricRecord(metrics),
                              "info": ConfigRecord({"frozen_digest": digest or ""})})
        return Message(content=content, reply_to=msg)

    return sapp, capp


# the deployment engine's entry points (`[tool.flwr.app.components]` of the generated app)
server_app, client_app = build_apps(None)
