"""RecLoRA on a small recommendation task built from offline data, against a single LoRA at equal trainable parameters.

    python bench/reclora.py --steps 60 --out bench/results/reclora.json

The task (documented in docs/workflows.md): the 2,225 BBC News articles are the items (title = the first 10 words, topic =
the hidden category). 48 synthetic users each have a taste: a Dirichlet(0.3) preference over the 5 topics; a user
likes an item when its topic is one of the user's two preferred topics (10% of labels flipped as noise). The paper's
long/short split: the **long** history (25 interactions per user, item IDs only) trains a conventional recommender
(CRM: logistic matrix factorisation, 8-d user and item embeddings) whose user embedding is the user representation;
the **short** history (the titles of the user's last 3 liked items) goes into the prompt. Query: "Will the user like
<title>? yes/no", answered by SmolLM2 with label words. Train and test queries are disjoint items of the same users.

Both adapters are trained by the same loop (lorakit's classification task, loss and evaluation), AdamW, same steps,
batches, rate and seed: LoRA r=8 on q/k/v/o, and RecLoRA with K=4 meta-LoRAs of rank 2 on the same layers mixed by
``softmax(G u)`` from the CRM user embedding u (the gate G is RecLoRA's only extra parameter, 4x8).

The learning rate: ``--lrs 3e-4,1e-3,3e-3 --val-size 120`` trains each method at each rate, holds out ``val-size``
training queries (never trained on) and reports, per method, the test accuracy at the rate with the best validation
accuracy (every run's numbers are kept in ``runs``). The file is rewritten after each run (a cut run keeps what
finished). ``yes_rate`` (the share of "yes" answers) shows a model that answers one way; ``short_history_oracle`` is
the test accuracy of answering "yes" exactly when the query's true topic is among the short history's topics (a
perfect topic reader of the prompt; the long history and the user embedding can do better).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time
from pathlib import Path

import torch

import lorakit
from lorakit import assets

N_USERS, LONG, SHORT, DIM = 48, 25, 3, 8


def build(seed: int = 0):
    rng = random.Random(seed)
    rows = assets._read_bbc()
    topics = sorted({r["label"] for r in rows})
    items = [{"title": " ".join(r["text"].split()[:10]), "topic": topics.index(r["label"])} for r in rows]
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # Dirichlet samples from the global generator: seed it (the task was not reproducible)
        torch.manual_seed(seed)
        prefs = torch.distributions.Dirichlet(torch.full((5,), 0.3)).sample((N_USERS,))
    top2 = prefs.topk(2, dim=1).indices.tolist()

    def likes(u, i):
        y = items[i]["topic"] in top2[u]
        return (not y) if rng.random() < 0.1 else y

    order = list(range(len(items)))
    rng.shuffle(order)
    n_hist = N_USERS * LONG
    hist_items, query_items = order[:n_hist], order[n_hist:]
    long_hist = {u: [(i, likes(u, i)) for i in hist_items[u * LONG:(u + 1) * LONG]] for u in range(N_USERS)}
    # the CRM: logistic matrix factorisation on the long (ID) histories
    U = torch.randn(N_USERS, DIM, generator=g) * 0.1
    V = torch.randn(len(items), DIM, generator=g) * 0.1
    U.requires_grad_(True)
    V.requires_grad_(True)
    pairs = torch.tensor([(u, i) for u in range(N_USERS) for i, _ in long_hist[u]])
    ys = torch.tensor([float(y) for u in range(N_USERS) for _, y in long_hist[u]])
    opt = torch.optim.Adam([U, V], lr=0.05)
    for _ in range(300):
        logit = (U[pairs[:, 0]] * V[pairs[:, 1]]).sum(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, ys) + 1e-3 * (U.pow(2).sum() + V.pow(2).sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
    user_repr = U.detach()

    def example(u, i):
        short = [j for j, y in long_hist[u] if y][-SHORT:]
        liked = [items[j]["title"] for j in short]
        text = ("The user recently liked: " + "; ".join(liked) + f".\nWill the user like: {items[i]['title']}?")
        # what a perfect topic reader of the prompt alone would answer: the query's topic is among the liked ones
        oracle = items[i]["topic"] in {items[j]["topic"] for j in short}
        return {"text": text, "label": "yes" if likes(u, i) else "no", "user": u, "oracle": oracle}

    per_user = len(query_items) // N_USERS
    train, test = [], []
    for u in range(N_USERS):
        mine = query_items[u * per_user:(u + 1) * per_user]
        cut = int(len(mine) * 0.75)
        train += [example(u, i) for i in mine[:cut]]
        test += [example(u, i) for i in mine[cut:]]
    return train, test, user_repr


@torch.no_grad()
def score(model, task, ex, users, U):
    """Accuracy and the share of "yes" answers on encoded examples, each chunk with its users' representations."""
    preds = []
    for i in range(0, len(ex), 16):
        with lorakit.batch_context(model, user_repr=U[users[i:i + 16]]):
            preds += task.predict_scores(model, ex[i:i + 16], batch_size=16).argmax(-1).tolist()
    ys = [e["y"] for e in ex]
    return {"accuracy": sum(p == y for p, y in zip(preds, ys)) / len(ys), "yes_rate": sum(preds) / len(preds)}


def run(method_cfg, base, tok, task, train_ex, test_ex, users_tr, users_te, U, steps, batch, lr, seed,
        val_ex=(), users_va=()):
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    lorakit.attach(model, method_cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = [rng.randrange(len(train_ex)) for _ in range(batch)]
        b = task.collate([train_ex[i] for i in idx])
        with lorakit.batch_context(model, user_repr=U[[users_tr[i] for i in idx]]):
            loss = task.loss(model, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    train_s = time.perf_counter() - t0
    te = score(model, task, test_ex, users_te, U)
    out = {"method": method_cfg["method"], "lr": lr, "accuracy": te["accuracy"], "yes_rate": te["yes_rate"],
           "trainable": sum(p.numel() for p in params), "train_seconds": train_s}
    if val_ex:
        out["val_accuracy"] = score(model, task, list(val_ex), list(users_va), U)["accuracy"]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--test-size", type=int, default=240)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lrs", help="comma-separated rates to try (default: --lr); the best on --val-size is reported")
    ap.add_argument("--val-size", type=int, default=0, help="training queries held out to choose the rate")
    ap.add_argument("--methods", default="lora,reclora")
    ap.add_argument("--out", default="bench/results/reclora.json")
    a = ap.parse_args()
    lrs = [float(x) for x in a.lrs.split(",")] if a.lrs else [a.lr]
    if len(lrs) > 1 and a.val_size < 1:
        ap.error("--lrs with more than one rate needs --val-size (the rate is chosen on held-out training queries)")
    from lorakit.tasks import get_task
    from lorakit.train.config import DataSection

    train, test, U = build(a.seed)
    test = random.Random(1).sample(test, min(a.test_size, len(test)))
    val = []
    if a.val_size:
        random.Random(2).shuffle(train)
        val, train = train[:a.val_size], train[a.val_size:]
    task = get_task("classify-lm", DataSection(task="classify-lm", labels=["no", "yes"], max_length=160,
                                               prompt="{text}\nAnswer:"))
    task.labels = ["no", "yes"]
    base, tok = assets.load_causal_lm("smollm2-135m")
    train_ex, test_ex = task.encode(train, tok), task.encode(test, tok)
    val_ex = task.encode(val, tok)
    users_tr, users_te, users_va = [r["user"] for r in train], [r["user"] for r in test], [r["user"] for r in val]
    qkvo = ["q_proj", "k_proj", "v_proj", "o_proj"]
    share = lambda rows: sum(r["label"] == "yes" for r in rows) / max(len(rows), 1)  # noqa: E731
    res = {"users": N_USERS, "long_history": LONG, "short_history": SHORT, "train": len(train), "val": len(val),
           "test": len(test), "steps": a.steps, "batch": a.batch, "lrs": lrs, "seed": a.seed,
           "threads": torch.get_num_threads(), "load_avg": os.getloadavg(),
           "yes_share": {"train": share(train), "val": share(val), "test": share(test)},
           "majority": max(sum(r["label"] == "yes" for r in test), sum(r["label"] == "no" for r in test)) / len(test)}
    res["short_history_oracle"] = sum(r["oracle"] == (r["label"] == "yes") for r in test) / len(test)
    res["zero_shot"] = score(base, task, test_ex, users_te, U)

    def save():
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(a.out).with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(res, indent=1) + "\n")
        os.replace(tmp, a.out)

    cfgs = {"lora": {"method": "lora", "targets": qkvo, "r": 8, "alpha": 16},
            "reclora": {"method": "reclora", "targets": qkvo, "r": 2, "alpha": 4, "num_loras": 4, "user_dim": DIM}}
    res["runs"], res["best"] = [], {}
    for name in a.methods.split(","):
        for lr in lrs:
            r = run(cfgs[name], base, tok, task, train_ex, test_ex, users_tr, users_te, U, a.steps, a.batch, lr,
                    a.seed, val_ex, users_va)
            print(json.dumps(r), flush=True)
            res["runs"].append(r)
            mine = [x for x in res["runs"] if x["method"] == name]
            res["best"][name] = max(mine, key=lambda x: x.get("val_accuracy", x["accuracy"]))
            save()
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
