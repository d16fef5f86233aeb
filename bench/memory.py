"""Memory of full-parameter training procedures and LoRA on SmolLM2-135M-Instruct (issue 17).

    PYTHONPATH=src python bench/memory.py [--steps 3] [--tokens 128] [--batch 2] [--device cpu|cuda] [--only a,b]

Each configuration of :data:`JOBS` runs in its own subprocess (so peak RSS is its own): load the model, attach the
method, build the procedure (``lorakit.procedures``, exactly as ``lorakit train`` does), run ``--steps`` optimiser
steps on one fixed random batch, then report

* ``state``: the optimiser-state bytes actually held (every tensor in ``optimizer.state``: moments, projectors,
  step counters, Fira's norms);
* ``formula``: the same bytes computed from the parameter shapes and the procedure's choices alone (the method's
  formula, written here, not read from the optimiser); the two must agree;
* ``peak RSS`` (``ru_maxrss``) and the RSS after loading the model; with ``--device cuda`` also
  ``torch.cuda.max_memory_allocated``;
* ``predicted``: weights + gradients + state bytes from the formula (the peak-memory model the RSS order is checked
  against; activations are the same batch for every job).

Ratios are to full fine-tuning with AdamW. Targets (issue 17): GaLore's state at rank 128 <= 0.35x AdamW's on the
projected matrices, LISA (gamma=2 of 30) <= 0.25x AdamW's state, measured peak RSS ordered as predicted.

To add a configuration, append a :class:`Job` to :data:`JOBS` (adapter config, procedure name and options) and, for
a new procedure, its state formula to :data:`FORMULAS` (``f(params, proc) -> bytes``; ``params`` are the
``TrainParam`` s the procedure trains, ``proc`` the built procedure after the steps).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from dataclasses import dataclass, field

FULL = {"method": "full", "targets": ".*", "keep_original": False}


@dataclass
class Job:
    name: str
    adapter: dict
    procedure: str = "adamw"
    options: dict = field(default_factory=dict)


JOBS: list[Job] = [
    Job("full FT (AdamW)", FULL),
    Job("LoRA r=8 all-linear (AdamW)", {"method": "lora", "targets": "all-linear", "r": 8, "alpha": 16}),
    Job("GaLore r=128", FULL, "galore", {"rank": 128, "update_proj_gap": 200, "scale": 0.25}),
    Job("Fira r=128", FULL, "fira", {"rank": 128, "update_proj_gap": 200, "scale": 0.25}),
    Job("FRUGAL rho=0.25 blocks", FULL, "frugal", {"density": 0.25, "update_gap": 200}),
    Job("LISA gamma=2 of 30", FULL, "lisa", {"layers": 2, "interval": 20}),
    Job("OwLore gamma=2, r=128", FULL, "owlore", {"layers": 2, "interval": 20, "rank": 128, "update_proj_gap": 200}),
    Job("GradNormLoRP r=128", FULL, "gradnormlorp", {"rank": 128, "update_proj_gap": 250, "scale": 0.25}),
]


# ---------------------------------------------------------------------------------------------- state formulas
def _b(t) -> int:
    return t.element_size()


def _adam(params) -> int:
    """torch AdamW: exp_avg + exp_avg_sq of each parameter's shape and a float32 step scalar per parameter."""
    return sum(2 * t.param.numel() * _b(t.param) + 4 for t in params)


def _galore(params, proc) -> int:
    from lorakit.procedures.galore import _side, projected

    c, total = proc.cfg, 0
    for t in params:
        p = t.param
        if projected(t, c.rank, c.targets):
            m, n = p.shape
            r = min(c.rank, m, n)
            side = _side(p.shape, c.proj_type)
            moments = 2 * (m * r if side == "right" else r * n)
            proj = r * n if side == "right" else m * r
            total += (moments + proj) * _b(p) + (4 if proc.name == "fira" else 0)  # Fira: one float32 norm
            if proc.name == "gradnormlorp":  # the magnitude's two Adam moments (d_out each)
                total += 2 * m * _b(p)
        else:
            total += 2 * p.numel() * _b(p)  # same Adam without projection; its step is a Python int
    return total


def _frugal(params, proc) -> int:
    chosen = {id(proc._blocks[i]) for i in proc.chosen}
    blocks = {id(p) for p in proc._blocks}
    return sum(2 * t.param.numel() * _b(t.param) for t in params
               if id(t.param) not in blocks or id(t.param) in chosen)  # state-free blocks: nothing


def _lisa(params, proc) -> int:
    from lorakit.procedures.lisa import layer_of

    on = set(proc.active)
    return sum(2 * t.param.numel() * _b(t.param) + 4 for t in params
               if layer_of(t, proc.cfg.layers_pattern) in on or layer_of(t, proc.cfg.layers_pattern) is None)


def _owlore(params, proc) -> int:
    from lorakit.procedures.lisa import layer_of

    on = set(proc.active)
    return _galore([t for t in params if layer_of(t, proc.cfg.layers_pattern) in on
                    or layer_of(t, proc.cfg.layers_pattern) is None], proc)


FORMULAS = {"adamw": lambda params, proc: _adam(params), "galore": _galore, "fira": _galore, "frugal": _frugal,
            "lisa": _lisa, "owlore": _owlore, "gradnormlorp": _galore}


def _grad_bytes(params, proc) -> int:
    if proc.name in ("lisa", "owlore"):
        from lorakit.procedures.lisa import layer_of

        on = set(proc.active)
        return sum(t.param.numel() * _b(t.param) for t in params
                   if layer_of(t, proc.cfg.layers_pattern) in on or layer_of(t, proc.cfg.layers_pattern) is None)
    return sum(t.param.numel() * _b(t.param) for t in params)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------------ child
def child(job: Job, a) -> dict:
    import torch

    import lorakit
    from lorakit.assets import load_causal_lm
    from lorakit.procedures import make_procedure, setup
    from lorakit.procedures.base import Hyper

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model, _ = load_causal_lm("smollm2-135m")
    dev = torch.device(a.device)
    model.to(dev)
    loaded = _rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    lorakit.attach(model, job.adapter)
    proc = make_procedure(job.procedure, job.options, Hyper(lr=1e-5))
    params, opt = setup(model, proc)
    proc.on_train_begin(model, opt, a.steps)
    x = torch.randint(0, model.config.vocab_size, (a.batch, a.tokens), generator=torch.Generator().manual_seed(0))
    x = x.to(dev)
    model.train()
    for step in range(a.steps):
        model(input_ids=x, labels=x).loss.backward()
        proc.before_step(step, model, opt)
        opt.step()
        proc.after_step(step, model, opt)
        opt.zero_grad(set_to_none=True)
    state = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                if torch.is_tensor(v))
    formula = FORMULAS[job.procedure](params, proc)
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    out = {"job": job.name, "state": state, "formula": formula, "peak_rss_mb": _rss_mb(), "loaded_rss_mb": loaded,
           "trainable": sum(t.param.numel() for t in params),
           "predicted": weights + _grad_bytes(params, proc) + formula}
    if dev.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    if job.procedure in ("galore", "fira", "gradnormlorp"):  # the target is on the projected matrices
        from lorakit.procedures.galore import projected

        proj = [t for t in params if projected(t, proc.cfg.rank, proc.cfg.targets)]
        out["projected_state"] = sum(v.numel() * v.element_size() for t in proj
                                     for v in opt.state[t.param].values() if torch.is_tensor(v))
        out["projected_adamw"] = sum(2 * t.param.numel() * t.param.element_size() + 4 for t in proj)
    return out


def formula_only() -> None:
    """State bytes of every job from its formula alone (the model built on the meta device: no memory, no steps).
    Sampled choices (LISA's/OwLore's blocks, FRUGAL's state-full matrices) are drawn as at the start of a run; every
    block of SmolLM2 has the same size, so the bytes do not depend on the draw."""
    import torch
    import transformers

    import lorakit
    from lorakit.assets import model_path
    from lorakit.procedures import make_procedure, setup
    from lorakit.procedures.base import Hyper

    cfg = transformers.AutoConfig.from_pretrained(model_path("smollm2-135m"))
    out = []
    for job in JOBS:
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(cfg)
        lorakit.attach(model, job.adapter, defer_init=True)
        proc = make_procedure(job.procedure, job.options, Hyper())
        params, opt = setup(model, proc)
        proc.on_train_begin(model, opt, 1)
        if job.procedure == "owlore":  # every block is on for its calibration step; then gamma blocks (equal sizes)
            proc.active = sorted(proc._blocks)[:proc.cfg.layers]
        out.append((job.name, FORMULAS[job.procedure](params, proc)))
    base = out[0][1]
    for name, b in out:
        print(f"| {name} | {b / 2 ** 20:.1f} MB | {b / base:.3f} |")


# ----------------------------------------------------------------------------------------------------- parent
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", default=None, help="comma-separated job indices (0-based)")
    ap.add_argument("--save", default=None, help="append each job's result (JSON) to this file as it completes")
    ap.add_argument("--load", default=None, help="print the table from results saved earlier with --save")
    ap.add_argument("--formula-only", action="store_true",
                    help="no training: each job's state bytes from its formula on the meta-device model")
    ap.add_argument("--job", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.formula_only:
        formula_only()
        return
    if a.job is not None:
        print("RESULT " + json.dumps(child(JOBS[a.job], a)), flush=True)
        return
    idx = range(len(JOBS)) if a.only is None else [int(i) for i in a.only.split(",")]
    rows = []
    if a.load:
        with open(a.load) as f:
            rows = [json.loads(ln) for ln in f if ln.strip()]
        idx = []
    for i in idx:
        cmd = [sys.executable, __file__, "--job", str(i)] + [f"--{k}={getattr(a, k)}" for k in
                                                             ("steps", "tokens", "batch", "threads", "device")]
        r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{JOBS[i].name}: failed\n{r.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(line[7:]))
        if a.save:
            with open(a.save, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
        print(f"done: {rows[-1]['job']}", file=sys.stderr, flush=True)
    base = next((r for r in rows if r["job"] == JOBS[0].name), None)
    mb = 2 ** 20
    print(f"SmolLM2-135M-Instruct, fp32, results of {a.load}" if a.load else
          f"SmolLM2-135M-Instruct, {a.device}, batch {a.batch}x{a.tokens}, {a.steps} steps, fp32")
    head = (f"| job | trainable | state MB | formula MB | agree | state / full FT | peak RSS MB | RSS - loaded MB "
            f"| RSS / full FT | predicted MB |" + (" CUDA peak MB |" if a.device == "cuda" else ""))
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        ok = "yes" if r["state"] == r["formula"] else f"NO ({r['state'] - r['formula']:+d} B)"
        s_ratio = r["state"] / base["state"] if base else float("nan")
        rss_ratio = r["peak_rss_mb"] / base["peak_rss_mb"] if base else float("nan")
        print(f"| {r['job']} | {r['trainable']:,} | {r['state'] / mb:.1f} | {r['formula'] / mb:.1f} | {ok} | "
              f"{s_ratio:.3f} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['loaded_rss_mb']:.0f} | "
              f"{rss_ratio:.3f} | {r['predicted'] / mb:.0f} |" + (f" {r['cuda_peak_mb']:.0f} |" if "cuda_peak_mb" in r
                                                                   else ""))
    for r in rows:
        if "projected_state" in r:
            print(f"{r['job']}: state on the projected matrices = {r['projected_state'] / r['projected_adamw']:.3f}x "
                  "AdamW's on the same matrices (target <= 0.35)")
    pred = [r["job"] for r in sorted(rows, key=lambda r: r["predicted"])]
    meas = [r["job"] for r in sorted(rows, key=lambda r: r["peak_rss_mb"])]
    print("predicted order (weights + grads + state):", " < ".join(pred))
    print("measured peak RSS order:                   ", " < ".join(meas))
    key = "cuda_peak_mb" if a.device == "cuda" else "peak_rss_mb"
    bad = [(x["job"], y["job"]) for x in rows for y in rows
           if x["predicted"] < y["predicted"] and x[key] > y[key]]
    print("pairs measured out of the predicted order:", bad or "none")


if __name__ == "__main__":
    main()
