"""Federated rounds on tiny models, without Flower: the server's global adapter, clients training through
``run_training`` from it on their Dirichlet shares, the strategies' aggregation. Checks D1/D2's invariants on real
trained tensors: A (FFA) and LoRA-SB's bases identical across clients and rounds, aggregation exact, bytes sent as
the formulas say."""
from __future__ import annotations

import numpy as np
import torch

from lorakit.federated import resolve_federated
from lorakit.federated.rounds import ServerSession, client_round, digest, nbytes
from lorakit.federated.split import dirichlet_split
from lorakit.federated.strategies import aggregate

from .conftest import tiny_cfg


def fed_cfg(model_dir, data, out, strategy, method="lora", **fed):
    base = tiny_cfg(model_dir, data, out)
    base["adapter"]["method"] = method
    base["optim"].update(warmup=0, schedule="constant")
    base["data"]["labels"] = ["positive", "negative"]
    base["train"]["threads"] = 1
    base["federated"] = {"strategy": strategy, "clients": 2, "rounds": 2, "local_steps": 2, "alpha": 0.5, **fed}
    return resolve_federated(base=base)


def run_rounds(fc, work):
    """The protocol without a network: returns the session and, per round, the clients' (sent, metrics)."""
    sess = ServerSession(fc)
    history = []
    for rnd in (1, 2):
        start = {**sess.sent, **sess.frozen}
        outs = [client_round(fc, k, rnd, start, work) for k in range(fc.fed.clients)]
        new, diag = aggregate(fc.fed.strategy, [o[0] for o in outs], [o[1]["num-examples"] for o in outs],
                              sess.pairs, vars(fc.fed))
        history.append((start, outs, new, diag))
        sess.set(new)
    return sess, history


def _modules(sess, suffix):
    return {k[: -len(suffix)]: v for k, v in {**sess.sent, **sess.frozen}.items() if k.endswith(suffix)}


def test_ffa_rounds_keep_A_identical_send_only_B_and_aggregate_exactly(tiny_lm_dir, cls_data, tmp_path):
    fc = fed_cfg(tiny_lm_dir, cls_data, tmp_path / "out", "ffa")
    sess, history = run_rounds(fc, tmp_path / "work")
    assert sess.sent and all(k.endswith("lora_B.weight") for k in sess.sent)
    assert sess.frozen and all(k.endswith("lora_A.weight") for k in sess.frozen)
    A = {k: v.clone() for k, v in sess.frozen.items()}
    a_digest = digest(A)
    labels = [r["label"] for r in sess.task.rows()["train"]]
    shares = [len(p) for p in dirichlet_split(labels, 2, 0.5, 0)]
    for start, outs, new, _ in history:
        assert [o[1]["frozen_digest"] for o in outs] == [a_digest, a_digest]  # A bit-identical, every round
        assert [o[1]["num-examples"] for o in outs] == shares  # p_k from the Dirichlet shares
        for sent, _ in outs:
            assert set(sent) == set(sess.sent)
            # bytes per client = 4 · Σ numel(B) = 4 · Σ d_out · r
            assert nbytes(sent) == 4 * sum(b.shape[0] * fc.run.adapter["r"] for b in sess.sent.values())
            assert any(not torch.equal(sent[k], start[k]) for k in sent)  # the client did train B
        p = np.array(shares, dtype=float) / sum(shares)
        for kb, B in new.items():
            Ak = A[kb.replace("lora_B", "lora_A")].double().numpy()
            ideal = sum(pk * (o[0][kb].double().numpy() @ Ak) for pk, o in zip(p, outs))
            np.testing.assert_allclose(B.double().numpy() @ Ak, ideal, atol=1e-6)
    for k, v in A.items():  # the server's A never moved either
        assert torch.equal(dict(sess.model.state_dict())[k], v)


def test_fedsb_sends_only_R_and_keeps_lora_sb_bases(tiny_lm_dir, cls_data, tmp_path):
    fc = fed_cfg(tiny_lm_dir, cls_data, tmp_path / "out", "fedsb", method="lora_sb")
    sess, history = run_rounds(fc, tmp_path / "work")
    r = fc.run.adapter["r"]
    assert sess.sent and all(k.endswith("lora_N.weight") and v.shape == (r, r) for k, v in sess.sent.items())
    bases = digest(sess.frozen)
    assert {k.rsplit(".", 2)[-2] for k in sess.frozen} == {"lora_A", "lora_B"}
    for _, outs, new, _ in history:
        assert [o[1]["frozen_digest"] for o in outs] == [bases, bases]
        for sent, _ in outs:
            assert nbytes(sent) == 4 * r * r * len(sess.sent)  # r² per module, whatever K is
        w = np.array([o[1]["num-examples"] for o in outs], dtype=float)
        p = w / w.sum()
        for kn, Rn in new.items():
            B = sess.frozen[kn.replace("lora_N", "lora_B")].double().numpy()
            A = sess.frozen[kn.replace("lora_N", "lora_A")].double().numpy()
            ideal = sum(pk * (B @ o[0][kn].double().numpy() @ A) for pk, o in zip(p, outs))
            np.testing.assert_allclose(B @ Rn.double().numpy() @ A, ideal, atol=1e-6)


def test_fedit_sends_both_factors_twice_ffa_bytes(tiny_lm_dir, cls_data, tmp_path):
    fc = fed_cfg(tiny_lm_dir, cls_data, tmp_path / "out", "fedit", rounds=1)
    sess = ServerSession(fc)
    r = fc.run.adapter["r"]
    assert {k.rsplit(".", 2)[-2] for k in sess.sent} == {"lora_A", "lora_B"} and not sess.frozen
    sent, _ = client_round(fc, 0, 1, dict(sess.sent), tmp_path / "work")
    mods = _modules(sess, ".lora_B.weight")
    want = 4 * sum(B.shape[0] * r + sess.sent[m + ".lora_A.weight"].shape[1] * r for m, B in mods.items())
    assert nbytes(sent) == want
    square = [m for m, B in mods.items() if B.shape[0] == sess.sent[m + ".lora_A.weight"].shape[1]]
    assert square  # q_proj/o_proj: d_in = d_out, where FFA-LoRA halves the bytes
    for m in square:
        assert sent[m + ".lora_B.weight"].numel() * 2 == sent[m + ".lora_B.weight"].numel() + \
            sent[m + ".lora_A.weight"].numel()


def test_dp_client_round_trains_only_B_and_reports_epsilon(tiny_lm_dir, cls_data, tmp_path):
    fc = fed_cfg(tiny_lm_dir, cls_data, tmp_path / "out", "ffa", rounds=1, dp=True, dp_noise=1.0, dp_clip=0.5)
    sess = ServerSession(fc)
    start = {**sess.sent, **sess.frozen}
    sent, m = client_round(fc, 0, 1, start, tmp_path / "work")
    assert set(sent) == set(sess.sent)  # B only
    assert m["frozen_digest"] == digest(sess.frozen)  # A untouched by the noisy steps
    assert any(not torch.equal(sent[k], start[k]) for k in sent)
    assert 0 < m["dp_epsilon"] < float("inf") and m["dp_delta"] == 1e-5
    assert 0 <= m["dp_clipped_share"] <= 1


def test_inprocess_driver_writes_the_flower_apps_result(tiny_lm_dir, cls_data, tmp_path):
    from lorakit.federated.rounds import run_inprocess

    fc = fed_cfg(tiny_lm_dir, cls_data, tmp_path / "out", "exact", rounds=2)
    res = run_inprocess(fc)
    assert [h["round"] for h in res["history"]] == [1, 2] and set(res["eval"]) == {"0", "1", "2"}
    for h in res["history"]:
        assert h["bytes_up"] == 2 * 4 * res["sent_numel"] and h["replies"] == 2
        assert 0 <= h["svd_truncation"] < 1
    assert res["history"][0]["bytes_down"] == res["history"][1]["bytes_down"] == 2 * 4 * res["sent_numel"]
    assert (tmp_path / "out" / "federated.json").is_file()
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
