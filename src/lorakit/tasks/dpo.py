"""Preference training with DPO (Rafailov et al. 2023, arXiv:2305.18290), as a task kind of ``lorakit train``.

Rows are ``{prompt, chosen, rejected}``. For each pair the policy (the model with its adapters) and the reference
(the *same* model under :func:`lorakit.disabled`: the base alone, so no second copy is kept) score the summed
log-probability of each completion after the prompt; with ``beta = data.dpo_beta``::

    r_c = beta · (log π(chosen|x) − log π_ref(chosen|x))        (the implicit rewards)
    r_r = beta · (log π(rejected|x) − log π_ref(rejected|x))
    loss = −log σ(r_c − r_r)                                     (mean over pairs)

Logged per step (``train`` records, TensorBoard ``train/rewards/...``) and at each evaluation: ``rewards/chosen``,
``rewards/rejected``, ``rewards/margin`` (r_c − r_r) and ``rewards/accuracy`` (share of pairs with r_c > r_r).
The reference pass runs without gradients and in eval mode (no dropout), as TRL's reference model does.

Named set ``gsm8k-dpo-smollm2``: GSM8K's worked answers as ``chosen`` and the same answers with the final number
replaced by a wrong one (everywhere it appears, seeded by the question) as ``rejected``: see :func:`corrupt_answer`.
"""
from __future__ import annotations

import random
import re

import torch
import torch.nn.functional as F

from .. import assets
from ..errors import ConfigError
from .base import Task, pad, to_device
from .logits import fast_head, labelled_logprobs, row_sums
from .sft import final_number

__all__ = ["DPO", "dpo_loss", "corrupt_answer", "sequence_logps"]


def dpo_loss(pc, pr, rc, rr, beta: float):
    """``(loss, stats)`` of the sigmoid DPO loss from the policy (``pc``, ``pr``) and reference (``rc``, ``rr``)
    summed log-probabilities of the chosen and rejected completions (tensors of shape (pairs,))."""
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    margin = chosen - rejected
    loss = -F.logsigmoid(margin).mean()
    stats = {"rewards/chosen": chosen.detach().mean(), "rewards/rejected": rejected.detach().mean(),
             "rewards/margin": margin.detach().mean(), "rewards/accuracy": (margin.detach() > 0).float().mean()}
    return loss, stats


def sequence_logps(logits, labels):
    """Summed log-probability of each row's labelled tokens (labels -100 elsewhere), next-token shifted."""
    logits, tgt = logits[:, :-1].float(), labels[:, 1:]
    lp = logits.log_softmax(-1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
    return (lp * (tgt != -100)).sum(1)


def corrupt_answer(answer: str, seed: str) -> str | None:
    """A GSM8K answer with its final number replaced by a different one: in the ``#### N`` line and wherever N
    stands as a whole number in the working (so the rejected answer is fluent but wrong). ``None`` when the answer
    has no integer final number. Deterministic for a given ``seed`` string."""
    final = final_number(answer)
    if final is None or not re.fullmatch(r"-?\d+", final):
        return None
    rng = random.Random(seed)
    n = int(final)
    wrong = n
    while wrong == n or wrong < 0 <= n:
        wrong = n + rng.choice([-1, 1]) * rng.randint(1, max(9, abs(n) // 4))
    head, sep, _ = answer.partition("####")
    head = re.sub(rf"(?<![\d.,]){re.escape(final)}(?![\d])", str(wrong), head)
    return f"{head}{sep} {wrong}" if sep else head


class DPO(Task):
    columns = ("prompt", "chosen", "rejected")
    is_classification = False

    def __init__(self, spec, data_cfg=None):
        super().__init__(spec, data_cfg)
        self._acc: list[dict] = []

    def rows(self):
        if self.cfg.path or not self.spec.dataset:
            return super().rows()
        self.columns = ("prompt", "completion")  # a named prompt/completion set: build the pairs
        try:
            out = super().rows()
        finally:
            self.columns = ("prompt", "chosen", "rejected")
        pairs = {}
        for split, rows in out.items():
            pairs[split] = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": bad}
                            for r in rows if (bad := corrupt_answer(r["completion"], r["prompt"])) is not None]
        return pairs

    def load_model(self, name, dtype="float32", cache=True):
        return assets.load_causal_lm(name, dtype, cache)

    def encode(self, rows, tok):
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        template = self.prompt_template()
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        L = self.cfg.max_length
        out = []
        for i, r in enumerate(rows):
            if r["chosen"].strip() == r["rejected"].strip():
                raise ConfigError(f"pair {i + 1}: chosen and rejected are the same text")
            p = tok(template.format(prompt=r["prompt"]))["input_ids"]
            c = tok(" " + r["chosen"].strip(), add_special_tokens=False)["input_ids"] + eos
            j = tok(" " + r["rejected"].strip(), add_special_tokens=False)["input_ids"] + eos
            if len(p) > L // 2 and len(p) + max(len(c), len(j)) > L:
                p = p[-(L // 2):]
            c, j = c[:max(L - len(p), 1)], j[:max(L - len(p), 1)]
            out.append({"prompt": p, "chosen": c, "rejected": j})
        return out

    def collate(self, examples):
        """2·n rows: the n chosen sequences, then the n rejected ones (labels: the completion tokens)."""
        seqs = [e["prompt"] + e["chosen"] for e in examples] + [e["prompt"] + e["rejected"] for e in examples]
        labs = [[-100] * len(e["prompt"]) + e["chosen"] for e in examples] + \
               [[-100] * len(e["prompt"]) + e["rejected"] for e in examples]
        return {"input_ids": pad(seqs, self.pad_id), "attention_mask": pad([[1] * len(s) for s in seqs], 0),
                "labels": pad(labs, -100)}

    def _pair(self, model, batch):
        from ..inject import disabled

        inputs = {k: v for k, v in batch.items() if k != "labels"}
        head = fast_head(model)  # None: full logits (a method reads them); else the completion tokens only
        n = batch["labels"].shape[0]

        def logps_of(m):
            if head is None:
                o = m(**inputs)
                return sequence_logps(o.logits, batch["labels"]), o
            lp, rows, o = labelled_logprobs(m, head, batch)
            return row_sums(lp, rows, n), o

        logps, out = logps_of(model)
        was = model.training
        model.eval()
        try:
            with torch.no_grad(), disabled(model):
                ref = logps_of(model)[0]
        finally:
            model.train(was)
        pc, pr = logps.chunk(2)
        rc, rr = ref.chunk(2)
        loss, stats = dpo_loss(pc, pr, rc, rr, self.cfg.dpo_beta)
        return loss, stats, out

    def forward(self, model, batch):
        loss, stats, out = self._pair(model, batch)
        if model.training:
            self._acc.append({k: float(v) for k, v in stats.items()})
        return loss, out

    def step_metrics(self) -> dict[str, float]:
        """The reward statistics of the micro-batches since the last call (averaged), for the step's log."""
        acc, self._acc = self._acc, []
        if not acc:
            return {}
        return {k: sum(a[k] for a in acc) / len(acc) for k in acc[0]}

    @torch.no_grad()
    def evaluate(self, model, tok, examples, batch_size=16):
        was = model.training
        model.eval()
        device = next(model.parameters()).device
        tot: dict[str, float] = {}
        n = 0
        try:
            for i in range(0, len(examples), max(batch_size // 2, 1)):
                chunk = examples[i:i + max(batch_size // 2, 1)]
                loss, stats, _ = self._pair(model, to_device(self.collate(chunk), device))
                for k, v in {"loss": loss, **stats}.items():
                    tot[k] = tot.get(k, 0.0) + float(v) * len(chunk)
                n += len(chunk)
        finally:
            model.train(was)
        return {k: v / max(n, 1) for k, v in tot.items()}
