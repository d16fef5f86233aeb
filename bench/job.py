"""The default job end to end: `lorakit train` vs PEFT + the Hugging Face `Trainer` doing the same job.

    PYTHONPATH=src python bench/job.py [--jobs lora,dora,qlora] [--reps 2] [--threads 2] [--steps 40]
                                       [--device cpu] [--json OUT.json]

The job is `lorakit train`'s embedded default (recipes/sentiment-smollm2-lora.yaml): SmolLM2-135M-Instruct as a
generative classifier on the sentiment set, LoRA r=8, alpha=16 on q/k/v/o_proj, batch 8, 40 steps, lr 1e-3 (cosine,
10% warmup), max_grad_norm 1, evaluated on 200 test rows before and after training. Jobs:

* ``lora``:  `lorakit train`                                   vs PEFT ``LoraConfig`` + ``Trainer``
* ``dora``:  `lorakit train adapter.method=dora`               vs PEFT ``LoraConfig(use_dora=True)`` + ``Trainer``
* ``qlora``: `lorakit train model.quantize=nf4` (q/k/v/o LoRA  vs PEFT on a bitsandbytes 4-bit NF4 base
  on an NF4 + double-quantised base)                              (``BitsAndBytesConfig``, double quant, fp32 compute)
                                                                   when bitsandbytes loads on this device, else on
                                                                   the fp32 base (the output says which)

Same rows on both sides: the anchor takes lorakit's tokenised training rows in lorakit's batch order (so both
see the same 320 rows in the same order) and the same 200 evaluation rows; it evaluates the way a user would (the
full logits of the last prompt token, the label words' columns). Hyperparameters: the same values through
`TrainingArguments` (HF's own cosine-with-warmup schedule, AdamW). Each run is its own process; the parent
measures each child's end-to-end wall time (process start to exit, imports and model load included) and its peak
RSS (``wait4``'s ``ru_maxrss`` for that child alone); the child reports the mean time per optimiser step and the
accuracy. Runs are interleaved (lorakit, anchor, lorakit, anchor, ...) so background load hits both sides.
Prints one JSON line per run, then a table of medians with lorakit/anchor ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOBS = ("lora", "dora", "qlora")
TARGETS = {"peak_rss_mb": 0.6, "wall_s": 0.85, "time_per_step_s": 0.95}


# ---- the anchor: PEFT + transformers' Trainer ---------------------------------------------------------------------
def anchor(job: str, steps: int, threads: int, device: str, eval_size: int | None = None) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from lorakit import assets
    from lorakit.tasks import get_task
    from lorakit.train import resolve
    from lorakit.train.loop import _batch_indices

    torch.set_num_threads(threads)
    # the embedded default job: the same task, rows, lengths and hyperparameters
    cfg = resolve(overrides=[f"data.eval_size={eval_size}"] if eval_size else None)
    dc, oc = cfg.data, cfg.optim
    task = get_task(dc.task, dc)
    rows = task.rows()
    path = assets.model_path(task.model_name(None))
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    note = ""
    kw = {"dtype": torch.float32}
    if job == "qlora":
        try:
            from transformers import BitsAndBytesConfig

            kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=torch.float32)
            if device == "cuda":
                kw["device_map"] = {"": 0}
            model = AutoModelForCausalLM.from_pretrained(path, **kw)
            note = "bitsandbytes 4-bit NF4 base"
        except Exception as e:  # noqa: BLE001 - report, then run the fp32 base
            note = f"fp32 base (bitsandbytes 4-bit load failed: {type(e).__name__}: {e})"[:300]
            kw.pop("quantization_config", None)
            kw.pop("device_map", None)
            model = AutoModelForCausalLM.from_pretrained(path, **kw)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
    if device == "cuda" and "device_map" not in kw:
        model.to("cuda")
    train_ex, eval_ex = task.encode(rows["train"], tok), task.encode(rows["eval"], tok)
    order = [j for i in range(steps) for j in _batch_indices(i, len(train_ex), dc.batch_size, cfg.train.seed)]
    data = [train_ex[j] for j in order]

    torch.manual_seed(cfg.train.seed)
    a = cfg.adapter
    lcfg = LoraConfig(r=a.get("r", 8), lora_alpha=a.get("alpha", 16), lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_dora=(job == "dora"),
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    label_cols = [w[0] for w in task.word_ids]

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        hits = 0
        dev = next(model.parameters()).device
        for i in range(0, len(eval_ex), dc.eval_batch_size):
            chunk = eval_ex[i:i + dc.eval_batch_size]
            n = max(len(e["prompt"]) for e in chunk)
            ids = torch.tensor([e["prompt"] + [task.pad_id] * (n - len(e["prompt"])) for e in chunk], device=dev)
            mask = torch.tensor([[1] * len(e["prompt"]) + [0] * (n - len(e["prompt"])) for e in chunk], device=dev)
            logits = model(input_ids=ids, attention_mask=mask).logits
            last = logits[torch.arange(len(chunk), device=dev), mask.sum(1) - 1].float().log_softmax(-1)
            pred = last[:, label_cols].argmax(-1).tolist()
            hits += sum(int(p == e["y"]) for p, e in zip(pred, chunk))
        model.train()
        return hits / len(eval_ex)

    before = evaluate()
    times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    class InOrder(Trainer):  # lorakit's batch order (the rows were laid out in it)
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    warm = int(round(oc.warmup * steps)) if oc.warmup < 1 else int(oc.warmup)
    out = tempfile.mkdtemp(prefix="job-anchor-")
    targs = TrainingArguments(output_dir=out, per_device_train_batch_size=dc.batch_size, max_steps=steps,
                              learning_rate=oc.lr, lr_scheduler_type=oc.schedule, warmup_steps=warm,
                              weight_decay=oc.weight_decay, max_grad_norm=oc.max_grad_norm or 0.0,
                              adam_beta1=oc.betas[0], adam_beta2=oc.betas[1], adam_epsilon=oc.eps,
                              optim="adamw_torch", logging_steps=10, save_strategy="no", report_to=[],
                              seed=cfg.train.seed, dataloader_num_workers=0, use_cpu=(device == "cpu"),
                              remove_unused_columns=False, disable_tqdm=True)
    tr = InOrder(model=model, args=targs, train_dataset=data, data_collator=task.collate, callbacks=[StepTimer()])
    tr.train()
    after = evaluate()
    return {"time_per_step_s": statistics.mean(times), "accuracy_before": before, "accuracy": after,
            "note": note, "steps": len(times)}


# ---- lorakit: the CLI ----------------------------------------------------------------------------------------------
def lorakit_cmd(job: str, steps: int, threads: int, device: str, out: str, eval_size: int | None = None) -> list[str]:
    args = [sys.executable, "-m", "lorakit", "train", f"output.dir={out}", f"train.threads={threads}",
            f"train.device={device}", f"train.steps={steps}"] + ([f"data.eval_size={eval_size}"] if eval_size else [])
    if job == "dora":
        args.append("adapter.method=dora")
    if job == "qlora":
        args.append("model.quantize=nf4")
    return args


# ---- the parent: one child process per run, interleaved -------------------------------------------------------------
def run_child(cmd: list[str], env: dict) -> tuple[float, float, int, str]:
    t = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t, ru.ru_maxrss / 1024, p.returncode, out


def one(side: str, job: str, a) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory(prefix=f"job-{side}-") as d:
        if side == "lorakit":
            wall, rss, rc, log = run_child(lorakit_cmd(job, a.steps, a.threads, a.device, d, a.eval_size), env)
            res = json.loads((Path(d) / "result.json").read_text()) if rc == 0 else {}
            rec = {"time_per_step_s": res.get("time_per_step_s"),
                   "accuracy_before": res.get("metrics_before", {}).get("accuracy"),
                   "accuracy": res.get("metrics_after", {}).get("accuracy"), "note": ""}
        else:
            js = Path(d) / "anchor.json"
            cmd = [sys.executable, __file__, "--worker", job, "--steps", str(a.steps), "--threads", str(a.threads),
                   "--device", a.device, "--json", str(js)] + (["--eval-size", str(a.eval_size)] if a.eval_size else [])
            wall, rss, rc, log = run_child(cmd, env)
            rec = json.loads(js.read_text()) if rc == 0 else {}
    if rc != 0:
        rec = {"error": log[-3000:]}
    return {"side": side, "job": job, "wall_s": wall, "peak_rss_mb": rss, "rc": rc, **rec}


def table(runs: list[dict]) -> str:
    lines = ["| job | metric | lorakit | anchor | ratio | target |", "|---|---|---|---|---|---|"]
    for job in dict.fromkeys(r["job"] for r in runs):
        med = {}
        for side in ("lorakit", "anchor"):
            rs = [r for r in runs if r["job"] == job and r["side"] == side and r["rc"] == 0]
            med[side] = {k: statistics.median(r[k] for r in rs) if rs else float("nan")
                         for k in ("time_per_step_s", "wall_s", "peak_rss_mb", "accuracy", "accuracy_before")}
            med[side]["n"] = len(rs)
        for k in ("time_per_step_s", "wall_s", "peak_rss_mb"):
            lo, an = med["lorakit"][k], med["anchor"][k]
            ratio = lo / an if an == an and an else float("nan")
            ok = "met" if ratio <= TARGETS[k] else "missed"
            lines.append(f"| {job} | {k} | {lo:.3f} | {an:.3f} | **{ratio:.3f}x** | <= {TARGETS[k]}x {ok} |")
        lo, an = med["lorakit"]["accuracy"], med["anchor"]["accuracy"]
        ok = "met" if abs(lo - an) <= 0.02 else "missed"
        lines.append(f"| {job} | accuracy (before -> after) | {med['lorakit']['accuracy_before']:.3f} -> {lo:.3f} | "
                     f"{med['anchor']['accuracy_before']:.3f} -> {an:.3f} | {lo - an:+.3f} | ±0.02 {ok} |")
        lines.append(f"| {job} | runs | {med['lorakit']['n']} | {med['anchor']['n']} | | |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", default="lora,dora,qlora")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--eval-size", type=int, help="evaluation rows (default: the job's 200); a short smoke run")
    ap.add_argument("--json", help="write the runs (and the machine) here")
    ap.add_argument("--worker", choices=JOBS, help=argparse.SUPPRESS)  # internal: run the anchor in this process
    a = ap.parse_args(argv)
    if a.worker:
        res = anchor(a.worker, a.steps, a.threads, a.device, a.eval_size)
        Path(a.json).write_text(json.dumps(res))
        return 0
    jobs = [j for j in a.jobs.split(",") if j]
    bad = [j for j in jobs if j not in JOBS]
    if bad:
        ap.error(f"unknown job(s) {bad}; choose from {JOBS}")
    machine = {"cpus": os.cpu_count(), "load_at_start": os.getloadavg(), "device": a.device,
               "threads": a.threads, "python": sys.version.split()[0]}
    if a.device == "cuda":
        import torch

        machine["gpu"] = torch.cuda.get_device_name(0)
    runs = []
    for rep in range(a.reps):
        for job in jobs:
            for side in ("lorakit", "anchor"):
                r = one(side, job, a)
                r["rep"] = rep
                runs.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "error"}), flush=True)
                if r["rc"]:
                    print(r["error"], file=sys.stderr, flush=True)
                if a.json:  # after every run: a long benchmark interrupted keeps what it measured
                    Path(a.json).write_text(json.dumps({"machine": machine, "runs": runs}, indent=1))
    machine["load_at_end"] = os.getloadavg()
    print(table(runs))
    print(json.dumps(machine))
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine, "runs": runs, "table": table(runs)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
