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

Rows: full FT, LoRA, GaLore, Fira, FRUGAL, LISA, OwLore, GradNormLoRP, SLTrain (a method: AdamW on its factors, sparse
values, embedding and norms) and LoRAM (LoRA on SmolLM2 pruned at ratio 0.5; the pruned model is written once by
``lorakit loram prune`` into ``$LORAKIT_BENCH_TMP`` (default /tmp) so the job's peak RSS is the pruned model's alone).
SLTrain's and LoRAM's formulas are written from the model config's shapes (``_linears``).

Ratios are to full fine-tuning with AdamW. Targets (issue 17): GaLore's state at rank 128 <= 0.35x AdamW's on the
projected matrices, LISA (gamma=2 of 30) <= 0.25x AdamW's state, measured peak RSS ordered as predicted.

To add a configuration, append a :class:`Job` to :data:`JOBS` (adapter config, procedure name and options) and, for
a new procedure, its state formula to :data:`FORMULAS` (``f(params, proc) -> bytes``; ``params`` are the
``TrainParam`` s the procedure trains, ``proc`` the built procedure after the steps).
"""
from __future__ import annotations

import argparse
import json
import math
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
    formula: str | None = None  # key of FORMULAS when not the procedure's (a method with its own state formula)
    model: str = "smollm2-135m"  # or "loram:RATIO": SmolLM2 structurally pruned by `lorakit loram prune`


# SLTrain on this fine-tuning-style job: the official defaults r=128 (the rank of the GaLore rows), alpha 32,
# sp_ratio 0.01 on every linear layer of the blocks, and, as in the paper's pre-training (and bench/sltrain.py), the
# embedding (tied head) and the norms train in full (as `adapter.trainable`, i.e. PEFT's modules_to_save: a trainable
# copy of the 28.3M-parameter embedding next to the frozen original). init="default" (W0 + s*BA + S, S starting at
# 0) rather than the pre-training "replace": the bytes are the same (the zeroed base stays allocated either way) and
# the job keeps fine-tuning a pretrained model like every other row.
SLTRAIN = {"method": "sltrain", "targets": "all-linear", "r": 128, "alpha": 32, "sp_ratio": 0.01, "init": "default",
           "trainable": ["embed_tokens", "norm", "input_layernorm", "post_attention_layernorm"]}
LORAM_RATIO = 0.5  # of the kv-head groups (2 of 3 kept: round(1.5) = 2) and MLP channels (768 of 1536 kept)


JOBS: list[Job] = [
    Job("full FT (AdamW)", FULL),
    Job("LoRA r=8 all-linear (AdamW)", {"method": "lora", "targets": "all-linear", "r": 8, "alpha": 16}),
    Job("GaLore r=128", FULL, "galore", {"rank": 128, "update_proj_gap": 200, "scale": 0.25}),
    Job("Fira r=128", FULL, "fira", {"rank": 128, "update_proj_gap": 200, "scale": 0.25}),
    Job("FRUGAL rho=0.25 blocks", FULL, "frugal", {"density": 0.25, "update_gap": 200}),
    Job("LISA gamma=2 of 30", FULL, "lisa", {"layers": 2, "interval": 20}),
    Job("OwLore gamma=2, r=128", FULL, "owlore", {"layers": 2, "interval": 20, "rank": 128, "update_proj_gap": 200}),
    Job("GradNormLoRP r=128", FULL, "gradnormlorp", {"rank": 128, "update_proj_gap": 250, "scale": 0.25}),
    Job("SLTrain r=128 d=0.01 (+emb, norms)", SLTRAIN, formula="sltrain"),
    Job(f"LoRAM pruned {LORAM_RATIO:.0%} + LoRA r=8 all-linear", {"method": "lora", "targets": "all-linear", "r": 8,
                                                                  "alpha": 16},
        formula="loram", model=f"loram:{LORAM_RATIO}"),
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


def _linears(cfg) -> list[tuple[int, int]]:
    """(d_out, d_in) of the seven linear layers of every Llama block, from the model config alone."""
    h, hd = cfg.hidden_size, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    q, kv, i = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.intermediate_size
    return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)] * cfg.num_hidden_layers


def _sltrain(params, proc, cfg) -> int:
    """AdamW on SLTrain's trainables, from the shapes: per linear layer A (r, d_in), B (d_out, r) and the
    floor(delta*d_out*d_in) sparse values (two fp32 moments each and a step scalar per tensor), plus the embedding
    (tied head: one tensor) and the 2 per block + 1 final RMSNorm weights trained in full."""
    r, d = SLTRAIN["r"], SLTRAIN["sp_ratio"]
    lin = sum(2 * 4 * (r * (m + n) + math.floor(d * m * n)) + 3 * 4 for m, n in _linears(cfg))
    norms = (2 * cfg.num_hidden_layers + 1) * (2 * 4 * cfg.hidden_size + 4)
    return lin + norms + 2 * 4 * cfg.vocab_size * cfg.hidden_size + 4


def _loram(params, proc, cfg) -> int:
    """AdamW on LoRA r=8 of every linear layer of the *pruned* model: r*(d_out'+d_in') per layer (two fp32 moments
    and two step scalars), d' from the pruned config (kept kv groups x their query heads, kept MLP channels)."""
    return sum(2 * 4 * 8 * (m + n) + 2 * 4 for m, n in _linears(cfg))


FORMULAS = {"adamw": lambda params, proc: _adam(params), "galore": _galore, "fira": _galore, "frugal": _frugal,
            "lisa": _lisa, "owlore": _owlore, "gradnormlorp": _galore, "sltrain": _sltrain, "loram": _loram}
MODEL_FORMULAS = {"sltrain", "loram"}  # written from the model config's shapes: f(params, proc, config)


def formula_of(job: Job, params, proc, cfg) -> int:
    key = job.formula or job.procedure
    return FORMULAS[key](params, proc, cfg) if key in MODEL_FORMULAS else FORMULAS[key](params, proc)


def pruned_dir(job: Job) -> str:
    """The pruned model of a LoRAM job (written once by `lorakit loram prune` in its own process, so the pruning's
    full-size copy never counts in the job's peak RSS)."""
    ratio = float(job.model.split(":")[1])
    return os.path.join(os.environ.get("LORAKIT_BENCH_TMP", "/tmp"), f"lorakit-bench-loram-smollm2-{ratio}")


def pruned_config(cfg, ratio: float):
    """The pruned model's config from the full one, as `lorakit.loram.prune_model` sizes it (for --formula-only)."""
    import copy

    small = copy.deepcopy(cfg)
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    keep_kv = max(1, round(cfg.num_key_value_heads * (1 - ratio)))
    small.num_key_value_heads, small.num_attention_heads, small.head_dim = keep_kv, keep_kv * group, hd
    small.intermediate_size = max(1, round(cfg.intermediate_size * (1 - ratio)))
    return small


def _grad_bytes(params, proc) -> int:
    if proc.name == "owlore":  # its calibration step (step 0) computes every block's gradient before sampling
        return sum(t.param.numel() * _b(t.param) for t in params)
    if proc.name == "lisa":
        from lorakit.procedures.lisa import layer_of

        on = set(proc.active)
        return sum(t.param.numel() * _b(t.param) for t in params
                   if layer_of(t, proc.cfg.layers_pattern) in on or layer_of(t, proc.cfg.layers_pattern) is None)
    return sum(t.param.numel() * _b(t.param) for t in params)


def _predicted_rest(params, proc, formula: int) -> int:
    """Gradients + state at the step's peak. OwLore: step 0 holds every block's gradient before the unsampled ones are
    dropped and the (smaller) state is created, so its peak is the larger of the two moments."""
    if proc.name == "owlore":
        from lorakit.procedures.lisa import layer_of

        on = set(proc.active)
        active = sum(t.param.numel() * _b(t.param) for t in params
                     if layer_of(t, proc.cfg.layers_pattern) in on or layer_of(t, proc.cfg.layers_pattern) is None)
        return max(_grad_bytes(params, proc), active + formula)
    return _grad_bytes(params, proc) + formula


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
    model, _ = load_causal_lm(pruned_dir(job) if job.model.startswith("loram:") else job.model)
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
    formula = formula_of(job, params, proc, model.config)
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    out = {"job": job.name, "state": state, "formula": formula, "peak_rss_mb": _rss_mb(), "loaded_rss_mb": loaded,
           "trainable": sum(t.param.numel() for t in params),
           "predicted": weights + _predicted_rest(params, proc, formula)}
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
        jcfg = pruned_config(cfg, float(job.model.split(":")[1])) if job.model.startswith("loram:") else cfg
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(jcfg)
        lorakit.attach(model, job.adapter, defer_init=True)
        proc = make_procedure(job.procedure, job.options, Hyper())
        params, opt = setup(model, proc)
        proc.on_train_begin(model, opt, 1)
        if job.procedure == "owlore":  # every block is on for its calibration step; then gamma blocks (equal sizes)
            proc.active = sorted(proc._blocks)[:proc.cfg.layers]
        out.append((job.name, formula_of(job, params, proc, jcfg)))
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
        if JOBS[i].model.startswith("loram:") and not os.path.isdir(pruned_dir(JOBS[i])):
            subprocess.run([sys.executable, "-m", "lorakit", "loram", "prune", "--model", "smollm2-135m", "--ratio",
                            JOBS[i].model.split(":")[1], "--out", pruned_dir(JOBS[i])], check=True, env=os.environ)
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
