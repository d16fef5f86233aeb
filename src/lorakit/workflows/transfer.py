"""Trans-LoRA: nearly data-free transfer of a classification adapter to a new base model (``lorakit transfer``).

Paper: Runqian Wang, Soumya Ghosh, David Cox, Diego Antognini, Aude Oliva, Rogerio Feris, Leonid Karlinsky,
"Trans-LoRA: towards data-free Transferable Parameter Efficient Finetuning", NeurIPS 2024, arXiv 2405.17258. No
official code was found; this follows the paper's description (its Figure 1 and Section 3).

Given a source base ``M_s`` with a trained adapter θ_s (the teacher), a handful of real task inputs D' (``seeds``)
and a target base ``M_t``:

1. *Discriminator data*: the source base, prompted with seed examples, writes synthetic inputs S_d.
2. *Discriminator*: an adapter on the source base is trained to tell D' (label ``real``) from S_d (``synthetic``):
   ``d(x) = p(real | x)``. Here it is an LS-LLaMA head classifier (task kind ``head-classify``, last-token
   pooling) on the source base, trained by :func:`lorakit.train.run_training` like any adapter.
3. *Transfer data*: the ``generator`` base (the target, as in the paper, or the source) writes candidates S;
   the filter keeps ``S* = {x ∈ S : d(x) >= threshold}`` (rejection sampling; duplicates, empty lines and verbatim
   copies of seeds are dropped first, so the student never sees a real example). ``min_kept`` (default 0, off)
   tops S* up with the next most real-looking candidates when too few pass; the summary reports how many passed.
4. *Teacher labels*: ``y(x) = argmax_c score_c(M_s + θ_s, x)`` for x ∈ S* (the task's own classifier scores: label-word
   log-likelihoods for ``lm-classify``, head logits for ``head-classify``): sequence-level distillation with the
   teacher's outputs as targets, as the paper trains the target on the teacher's generations. With ``balance: true``
   each class is then cut to the smallest class's count, keeping the labelled candidates the discriminator scored most
   real (:func:`balance_labels`).
5. *Student*: an adapter (any method: ``student.adapter``; any procedure: ``student.optim``) trains on
   ``{(x, y(x)) : x ∈ S*}`` on ``M_t`` with the same trainer as ``lorakit train``; it is evaluated on the task's
   real held-out split, which no step above reads.

The comparison the paper makes (``baseline: true``): the same student trained directly on the seeds D' alone.

Choices where the paper is unclear or that differ, and why:

* The discriminator is a classification head (LS-LLaMA) rather than a LoRA that generates "real"/"fake": the same
  decision function with one forward pass, and the same adapter machinery. Its training set balances the classes by
  repeating the seeds (the handful of reals would otherwise be a small minority of the rows).
* Hard teacher labels (argmax), not soft targets: the paper distils on the teacher's generated outputs, which for a
  label-word classifier is its argmax label.
* ``balance`` (default off; the packaged recipe turns it on) is our addition: a small generator's synthetic inputs
  are not class-balanced (the first measured run's teacher labelled 38 of 49 kept inputs positive, and the student
  learnt to answer "positive"). Balancing the distillation set by down-sampling is a standard, documented choice; the
  labels are still the teacher's, nothing else changes. The summary reports the teacher's counts before and after.
* The default ``gen_prompt`` ends with ``"\n-"``, not ``"\n- "``: a BPE tokenizer (SmolLM2's) writes the space as
  part of the next word's token, so a prompt ending in a space pushes the model toward space-less tokens (it
  started most lines with digits: "1982 single wow ."). ``_clean`` strips the leading space of each line.
* A target that is a *different* model is needed to demonstrate transfer offline; :func:`derive_model` builds one from
  SmolLM2 by dropping decoder layers (see ``recipes/workflows/transfer-sentiment.yaml`` and docs/workflows.md).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .. import assets
from ..config import AttachConfig, from_dict
from ..errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["TransferConfig", "make_config", "derive_model", "generate_inputs", "discriminate", "keep_real",
           "teacher_labels", "balance_labels", "transfer", "synthesize", "distil", "run_baseline"]


@dataclass
class TransferConfig:
    task: str = "sentiment-smollm2"  # the source adapter's task (prompt, labels, label words, held-out split)
    source_model: str = "smollm2-135m"
    source_adapter: str | None = None  # the teacher's adapter directory (required)
    target_model: str = "smollm2-135m"  # a lorakit model or a local HF directory
    target_drop_layers: list[int] = field(default_factory=list)  # derive the target: these decoder layers removed
    target_dir: str | None = None  # where the derived target is written (None: the lorakit cache, once)
    generator: Literal["target", "source"] = "target"  # which base writes the transfer candidates (paper: target)
    seeds: int = 8  # |D'|: real task inputs kept (taken from the task's training split with `seed`)
    disc_synthetic: int = 64  # synthetic inputs for the discriminator's training
    candidates: int = 256  # synthetic transfer candidates before the filter
    threshold: float = 0.5  # keep a candidate when the discriminator's p(real) >= threshold
    min_kept: int = 0  # fewer passed: add the next most real-looking candidates up to this many (recorded)
    shots: int = 3  # seed examples in each generation prompt
    gen_prompt: str = "Here are some examples of short texts, one per line:\n{examples}\n-"
    max_new_tokens: int = 40
    temperature: float = 1.0
    top_p: float = 0.95
    gen_batch: int = 16
    balance: bool = False  # distil on a class-balanced set: every class cut to the smallest's count (most real first)
    discriminator: dict[str, Any] = field(default_factory=lambda: {
        "adapter": {"method": "lora", "targets": "all-attention", "r": 8, "alpha": 16, "seed": 0},
        "optim": {"lr": 1e-3}, "train": {"steps": 30}, "data": {"batch_size": 8, "max_length": 64}})
    student: dict[str, Any] = field(default_factory=lambda: {
        "adapter": {"method": "lora", "targets": "all-attention", "r": 8, "alpha": 16, "seed": 0},
        "optim": {"lr": 1e-3}, "train": {"steps": 40}, "data": {"batch_size": 8, "max_length": 64,
                                                                 "eval_batch_size": 50}})
    eval_size: int = 200  # real held-out rows scored for the source, the student and the baseline
    baseline: bool = True  # also train the student on the seeds alone (the paper's comparison)
    out: str = "runs/transfer"
    seed: int = 0
    threads: int | None = None

    def validate(self) -> None:
        if self.min_kept < 0:
            raise ConfigError(f"transfer.min_kept={self.min_kept} must be >= 0")
        for k in ("seeds", "disc_synthetic", "candidates", "shots", "max_new_tokens", "gen_batch", "eval_size"):
            if getattr(self, k) < 1:
                raise ConfigError(f"transfer.{k}={getattr(self, k)} must be >= 1")
        if self.shots > self.seeds:
            raise ConfigError(f"transfer.shots={self.shots} must be <= transfer.seeds={self.seeds}")
        if not 0 <= self.threshold <= 1:
            raise ConfigError(f"transfer.threshold={self.threshold} must be in [0, 1]")
        if not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ConfigError("transfer.temperature must be > 0 and transfer.top_p in (0, 1]")
        if "{examples}" not in self.gen_prompt:
            raise ConfigError("transfer.gen_prompt must contain {examples}")
        if any(i < 0 for i in self.target_drop_layers):
            raise ConfigError(f"transfer.target_drop_layers={self.target_drop_layers} must be layer indices >= 0")
        for part in ("discriminator", "student"):
            sec = getattr(self, part)
            bad = set(sec) - {"adapter", "optim", "train", "data", "model"}
            if bad:
                raise ConfigError(f"transfer.{part}: unknown section(s) {sorted(bad)}; valid: adapter, data, model, "
                                  "optim, train")
            AttachConfig.make(dict(sec.get("adapter") or {"method": "lora"}))


def make_config(config: TransferConfig | dict | None = None) -> TransferConfig:
    if isinstance(config, TransferConfig):
        config.validate()
        return config
    return from_dict(TransferConfig, config or {}, where="transfer")


# ---------------------------------------------------------------------------------------------------------------
# the target base
# ---------------------------------------------------------------------------------------------------------------
def derive_model(name: str, drop_layers: list[int], out: str | os.PathLike | None = None) -> Path:
    """A new causal LM: ``name`` with the decoder layers ``drop_layers`` removed (the others keep their weights and
    order; attention ``layer_idx`` renumbered for the KV cache), saved with its tokenizer. Written to a temporary
    sibling and renamed, once per (model, layers): ``$LORAKIT_CACHE/models/<name>-drop-<layers>``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = assets.model_path(name)
    drop = sorted(set(int(i) for i in drop_layers))
    if out is None:
        tag = "-".join(map(str, drop)) if len(drop) <= 8 else hashlib.sha1(str(drop).encode()).hexdigest()[:10]
        stem = str(name)
        if name not in assets.MODELS:  # a local directory: its path and config's mtime tell two models apart
            ident = f"{Path(src).resolve()}:{(Path(src) / 'config.json').stat().st_mtime_ns}"
            stem = f"{Path(src).name}-{hashlib.sha1(ident.encode()).hexdigest()[:8]}"
        out = assets.cache_dir() / "models" / f"{stem}-drop-{tag}"
    out = Path(out)
    if (out / "config.json").is_file():
        return out
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    layers = model.model.layers
    if not drop or drop[-1] >= len(layers) or len(drop) >= len(layers):
        raise ConfigError(f"target_drop_layers={drop_layers}: {name} has {len(layers)} layers (indices 0.."
                          f"{len(layers) - 1}); drop at least one and keep at least one")
    kept = [m for i, m in enumerate(layers) if i not in drop]
    for j, m in enumerate(kept):
        if hasattr(m, "self_attn") and hasattr(m.self_attn, "layer_idx"):
            m.self_attn.layer_idx = j
    model.model.layers = torch.nn.ModuleList(kept)
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [t for i, t in enumerate(model.config.layer_types) if i not in drop]
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
    (tmp / "lorakit-derived.json").write_text(json.dumps({"from": str(name), "dropped_layers": drop}))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# the steps (each usable alone)
# ---------------------------------------------------------------------------------------------------------------
def _clean(text: str) -> str:
    return " ".join(text.split("\n", 1)[0].split())


@torch.no_grad()
def generate_inputs(model, tok, seeds: list[str], n: int, cfg: TransferConfig, exclude: set[str] = frozenset(),
                    rng: random.Random | None = None) -> list[str]:
    """``n`` distinct synthetic task inputs: the model continues ``gen_prompt`` listing ``shots`` random seeds
    (sampling, one line each). Empty lines, duplicates and anything in ``exclude`` (the seeds) are dropped; stops
    after ``4·n`` attempts with what it has."""
    rng = rng or random.Random(cfg.seed)
    device = next(model.parameters()).device
    was, side = model.training, tok.padding_side
    model.eval()
    tok.padding_side = "left"
    out: list[str] = []
    seen = set(exclude)
    tries = 0
    try:
        while len(out) < n and tries < 4 * n:
            prompts = []
            for _ in range(min(cfg.gen_batch, 4 * n - tries)):
                shots = rng.sample(seeds, cfg.shots)
                prompts.append(cfg.gen_prompt.format(examples="\n".join(f"- {_clean(s)}" for s in shots)))
            tries += len(prompts)
            enc = tok(prompts, return_tensors="pt", padding=True).to(device)
            gen = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=True,
                                 temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
            for row in gen[:, enc["input_ids"].shape[1]:]:
                text = _clean(tok.decode(row, skip_special_tokens=True))
                if len(text.split()) >= 3 and text not in seen:
                    seen.add(text)
                    out.append(text)
    finally:
        model.train(was)
        tok.padding_side = side
    return out[:n]


def discriminate(task, model, tok, texts: list[str]) -> list[float]:
    """``p(real | x)`` for each text from a discriminator (a head-classify model whose labels are
    ``["real", "synthetic"]`` in ``task.labels`` order)."""
    if not texts:
        return []
    ex = task.encode([{"text": t, "label": task.labels[0]} for t in texts], tok)
    p = task.predict_scores(model, ex).float().softmax(-1)
    return p[:, task.labels.index("real")].tolist()


def keep_real(texts: list[str], p_real: list[float], threshold: float, min_kept: int = 0) -> list[str]:
    """The filter: the texts the discriminator scores as real (``p(real) >= threshold``), in order. With
    ``min_kept``, when fewer pass, the most real-looking of the rest are added until there are ``min_kept``."""
    keep = {i for i, p in enumerate(p_real) if p >= threshold}
    if len(keep) < min_kept:
        rest = sorted((i for i in range(len(texts)) if i not in keep), key=lambda i: -p_real[i])
        keep |= set(rest[:min_kept - len(keep)])
    return [t for i, t in enumerate(texts) if i in keep]


def balance_labels(labels: list[str], p_real: list[float], classes: list[str]) -> list[int]:
    """Indices (in their original order) of a class-balanced subset: every class in ``classes`` keeps ``n = min_c
    count_c`` rows, those with the highest ``p_real`` (ties: the earlier row). A class with no row is a
    ``ConfigError`` (nothing balanced can be built: generate more candidates or turn ``balance`` off)."""
    counts = {c: labels.count(c) for c in classes}
    n = min(counts.values()) if counts else 0
    if n == 0:
        raise ConfigError(f"transfer.balance: the teacher labelled {counts} of {len(labels)} kept candidates, so a "
                          "balanced set is empty; generate more (transfer.candidates) or set transfer.balance=false")
    keep: set[int] = set()
    for c in classes:
        idx = sorted((i for i, y in enumerate(labels) if y == c), key=lambda i: (-p_real[i], i))
        keep.update(idx[:n])
    return sorted(keep)


def teacher_labels(task, model, tok, texts: list[str]) -> list[str]:
    """The teacher's label for each text: the argmax of the task's class scores under ``model`` (source + adapter)."""
    if not texts:
        return []
    ex = task.encode([{"text": t, "label": task.labels[0]} for t in texts], tok)
    return [task.labels[i] for i in task.predict_scores(model, ex).argmax(-1).tolist()]


# ---------------------------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------------------------
def _write_rows(path: Path, rows: list[dict]) -> Path:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in rows),
                   encoding="utf-8")
    os.replace(tmp, path)
    return path


def _run(section: dict, task: str, model: str, out: Path, train_path: Path, eval_path: Path, labels: list[str],
         seed: int, threads: int | None, eval_size: int, model_eval_before: bool = True) -> dict:
    from ..train import resolve, run_training

    base = {"model": {**(section.get("model") or {}), "name": model},
            "adapter": dict(section.get("adapter") or {"method": "lora"}),
            "optim": dict(section.get("optim") or {}),
            "data": {**(section.get("data") or {}), "task": task, "path": str(train_path), "eval_path": str(eval_path),
                     "labels": list(labels), "eval_size": eval_size},
            "train": {"seed": seed, "log_every": 0, "eval_before": model_eval_before, **(section.get("train") or {}),
                      **({"threads": threads} if threads else {})},
            "output": {"dir": str(out)}}
    return run_training(resolve(base=base))


def _setup(cfg: TransferConfig, need_adapter: bool = True):
    """Checks, the task's rows, the seeds D' (a seeded draw from the training split), the held-out file, the target."""
    from ..io import read_adapter_config
    from ..tasks import TASKS, get_task
    from ..train.config import DataSection

    if need_adapter:
        if not cfg.source_adapter:
            raise ConfigError("transfer.source_adapter is required: the teacher's adapter directory (lorakit train ...)")
        read_adapter_config(cfg.source_adapter)  # a missing or malformed adapter fails before any model loads
    if cfg.task not in TASKS:
        raise ConfigError(f"unknown task '{cfg.task}'; known tasks: {', '.join(TASKS)}")
    if not TASKS[cfg.task].kind.endswith("classify"):
        raise ConfigError(f"transfer.task={cfg.task} is a {TASKS[cfg.task].kind} task; Trans-LoRA here transfers "
                          "classification adapters (lm-classify, head-classify, encoder-classify)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    student_data = dict(cfg.student.get("data") or {})
    task = get_task(cfg.task, DataSection(task=cfg.task, eval_size=cfg.eval_size,
                                          max_length=student_data.get("max_length", 128)))
    rows = task.rows()
    seeds = random.Random(cfg.seed).sample(rows["train"], cfg.seeds)
    eval_path = _write_rows(out / "eval.jsonl", rows["eval"])
    seeds_path = _write_rows(out / "seeds.jsonl", seeds)
    target = derive_model(cfg.target_model, cfg.target_drop_layers, cfg.target_dir) if cfg.target_drop_layers \
        else cfg.target_model
    return task, rows, seeds, eval_path, seeds_path, str(target), out


def run_baseline(config: TransferConfig | dict | None = None, *, eval_before: bool = True) -> dict[str, Any]:
    """The paper's comparison alone: the student trained on the target base on the seeds D' only (the same seeds,
    steps and held-out rows as :func:`transfer`); ``{"target_base", "baseline_seeds", ...}``."""
    cfg = make_config(config)
    task, rows, seeds, eval_path, seeds_path, target, out = _setup(cfg, need_adapter=False)
    b_res = _run(cfg.student, cfg.task, target, out / "baseline-seeds", seeds_path, eval_path, task.labels,
                 cfg.seed, cfg.threads, cfg.eval_size, model_eval_before=eval_before)
    res = {"target_model": target, "seeds": len(seeds), "baseline_seeds": b_res["metrics_after"],
           "target_base": b_res["metrics_before"]}
    (out / "baseline.json").write_text(json.dumps(res, indent=2, default=float))
    return res


def synthesize(config: TransferConfig | dict | None = None, *, log_fn=None) -> dict[str, Any]:
    """Steps 1-3 (no teacher needed): synthetic inputs for the discriminator, the discriminator, the transfer
    candidates and the filter. Writes ``out/candidates.jsonl`` (text, p_real, kept) and ``out/synthesis.json``;
    :func:`distil` continues from them (so one synthetic set can be distilled into several students)."""
    from ..io import load_adapter
    from ..tasks import get_task
    from ..train.config import DataSection

    cfg = make_config(config)
    say = log_fn or log.info
    task, rows, seeds, eval_path, seeds_path, target, out = _setup(cfg, need_adapter=False)
    rng = random.Random(cfg.seed)
    rng.sample(rows["train"], cfg.seeds)  # the draw _setup made: the generation stream continues after it
    seed_texts = [r["text"] for r in seeds]

    # 1. discriminator data from the source base
    src_lm, src_tok = assets.load_causal_lm(cfg.source_model)
    torch.manual_seed(cfg.seed)
    disc_syn = generate_inputs(src_lm, src_tok, seed_texts, cfg.disc_synthetic, cfg, set(seed_texts), rng)
    say(f"discriminator data: {len(seed_texts)} real, {len(disc_syn)} synthetic")
    # 3. transfer candidates from the generator base (written before the discriminator trains: same RNG stream)
    if cfg.generator == "target":
        del src_lm
        gen_lm, gen_tok = assets.load_causal_lm(str(target))
    else:
        gen_lm, gen_tok = src_lm, src_tok
    cands = generate_inputs(gen_lm, gen_tok, seed_texts, cfg.candidates, cfg, set(seed_texts) | set(disc_syn), rng)
    del gen_lm
    say(f"transfer candidates from the {cfg.generator} base: {len(cands)}")

    # 2. the discriminator: real (seeds, repeated to balance) vs synthetic, a head classifier on the source base
    reps = max(1, round(len(disc_syn) / max(len(seed_texts), 1)))
    d_rows = [{"text": t, "label": "real"} for t in seed_texts] * reps + \
        [{"text": t, "label": "synthetic"} for t in disc_syn]
    random.Random(cfg.seed).shuffle(d_rows)
    d_path = _write_rows(out / "discriminator_train.jsonl", d_rows)
    d_res = _run(cfg.discriminator, "classify-head", cfg.source_model, out / "discriminator", d_path, d_path,
                 ["real", "synthetic"], cfg.seed, cfg.threads, min(len(d_rows), 64), model_eval_before=False)
    dtask = get_task("classify-head", DataSection(task="classify-head", path=str(d_path), labels=["real", "synthetic"],
                                                 max_length=(cfg.discriminator.get("data") or {}).get("max_length",
                                                                                                      128)))
    dtask.rows()
    disc, dtok = dtask.load_model(cfg.source_model)
    load_adapter(disc, d_res["adapter_dir"])
    p_real = discriminate(dtask, disc, dtok, cands)
    del disc
    kept = keep_real(cands, p_real, cfg.threshold, cfg.min_kept)
    passed = sum(p >= cfg.threshold for p in p_real)
    say(f"discriminator: {passed} of {len(cands)} candidates have p(real) >= {cfg.threshold}; {len(kept)} kept")
    if not kept:
        raise ConfigError(f"the discriminator kept none of the {len(cands)} candidates at threshold "
                          f"{cfg.threshold}; lower transfer.threshold or generate more (transfer.candidates)")
    kept_set = set(kept)
    tmp = out / f"candidates.jsonl.tmp{os.getpid()}"
    with tmp.open("w", encoding="utf-8") as f:
        for t, p in zip(cands, p_real):
            f.write(json.dumps({"text": t, "p_real": p, "kept": t in kept_set}) + "\n")
    os.replace(tmp, out / "candidates.jsonl")
    res = {"target_model": target, "discriminator_train": d_res["metrics_after"], "disc_synthetic": len(disc_syn),
           "candidates": len(cands), "kept": len(kept), "passed_threshold": passed,
           "acceptance": passed / max(len(cands), 1)}
    (out / "synthesis.json").write_text(json.dumps(res, indent=2, default=float))
    return res


def distil(config: TransferConfig | dict | None = None, *, log_fn=None) -> dict[str, Any]:
    """Steps 4-5 after :func:`synthesize` (same ``out``): the teacher labels the kept candidates, the student trains
    on them on the target base, the baseline (``baseline``) on the seeds alone; writes ``out/summary.json``."""
    from ..io import load_adapter
    from ..train.loop import seed_everything

    cfg = make_config(config)
    say = log_fn or log.info
    task, rows, seeds, eval_path, seeds_path, target, out = _setup(cfg)
    if not (out / "synthesis.json").is_file() or not (out / "candidates.jsonl").is_file():
        raise ConfigError(f"{out} holds no synthetic set: run the synthesis first (lorakit transfer --stage "
                          "synthesize, or the whole transfer)")
    summary: dict[str, Any] = {"task": cfg.task, "seeds": len(seeds), "out": str(out),
                               **json.loads((out / "synthesis.json").read_text())}
    kept_rows = [c for c in map(json.loads, (out / "candidates.jsonl").read_text(encoding="utf-8").splitlines())
                 if c["kept"]]
    kept = [c["text"] for c in kept_rows]

    # the teacher: the source base + its adapter, scored on the real held-out rows (the number to recover)
    seed_everything(cfg.seed)
    teacher, tok = task.load_model(cfg.source_model)
    load_adapter(teacher, cfg.source_adapter)
    summary["source"] = task.evaluate(teacher, tok, task.encode(rows["eval"], tok), 50)
    say(f"source + adapter on {len(rows['eval'])} held-out rows: {summary['source']}")

    # 4. teacher labels
    labels = teacher_labels(task, teacher, tok, kept)
    del teacher
    summary["label_counts"] = {c: labels.count(c) for c in task.labels}
    if cfg.balance:
        idx = balance_labels(labels, [c["p_real"] for c in kept_rows], list(task.labels))
        kept, labels = [kept[i] for i in idx], [labels[i] for i in idx]
        summary["label_counts_balanced"] = {c: labels.count(c) for c in task.labels}
        say(f"teacher labels {summary['label_counts']}; balanced to {summary['label_counts_balanced']}")
    syn_path = _write_rows(out / "synthetic.jsonl", [{"text": t, "label": y} for t, y in zip(kept, labels)])

    # 5. the student on the target base, synthetic data only; and the baseline on the seeds alone
    s_res = _run(cfg.student, cfg.task, target, out / "student", syn_path, eval_path, task.labels, cfg.seed,
                 cfg.threads, cfg.eval_size)
    summary["target_base"] = s_res["metrics_before"]
    summary["student"] = s_res["metrics_after"]
    summary["student_adapter"] = s_res["adapter_dir"]
    summary["student_train_rows"] = s_res["train_rows"]
    if cfg.baseline:  # the same base: scored once, above
        summary["baseline_seeds"] = run_baseline(cfg, eval_before=False)["baseline_seeds"]
    acc = summary["source"].get("accuracy")
    if acc and not math.isnan(acc):
        summary["recovered"] = summary["student"]["accuracy"] / acc
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


def transfer(config: TransferConfig | dict | None = None, *, log_fn=None) -> dict[str, Any]:
    """Run Trans-LoRA end to end (module docstring): :func:`synthesize` then :func:`distil`; writes everything under
    ``out`` and returns the summary: source / student / baseline held-out metrics, counts, the acceptance rate."""
    cfg = make_config(config)
    _setup(cfg)  # the teacher's adapter is checked before anything is generated
    synthesize(cfg, log_fn=log_fn)
    return distil(cfg, log_fn=log_fn)
