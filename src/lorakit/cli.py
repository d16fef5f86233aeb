"""``lorakit`` command line. Subcommands:

  train     [CONFIG.yaml] [key=value ...] [--method NAME] [--resume]   fine-tune an adapter
  eval      --adapter DIR [TASK] [key=value ...]                       evaluate a trained adapter
  generate  --adapter DIR "prompt"                                      stream a completion
  methods   [--markdown [PATH]]                                         the registered methods
  inspect   MODEL [--targets SPEC] [--exclude SPEC] [--layers N ...]    which modules a target spec matches
  assets    [list | prepare [NAME ...]]                                 offline models and datasets
  extract   --base B --tuned T (--rank R | --energy F) --out DIR         a PEFT LoRA from a fully tuned model
  recipes   [NAME]                                                      the packaged recipes and method files
  federate  CONFIG.yaml [key=value ...]                                 federated LoRA on Flower (docs/federated.md)
  merge     CONFIG.yaml [--check]                                       merge adapters (TIES, DARE, LoRA-LEGO, ...)
  temp-lora perplexity|generate [RECIPE] [key=value ...]               Temp-Lora (a temporary adapter at inference)
  transfer  [RECIPE] transfer.source_adapter=DIR [key=value ...]        Trans-LoRA (move an adapter to a new base)
  arena     run [--methods ..] [--tasks ..] [--seeds 0,1,2] [--budget ..] | report | plan
                                                                        every method on the same tasks and budget

With no arguments ``lorakit train`` fine-tunes SmolLM2-135M-Instruct with LoRA on movie-review sentiment and prints
held-out accuracy before and after.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("lorakit.cli")


def _out(*a) -> None:
    print(*a, flush=True)


def _table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[("" if c is None else str(c)) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip()  # noqa: E731
    return "\n".join([line(cells[0]), "  ".join("-" * x for x in w)] + [line(r) for r in cells[1:]])


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _split_config_args(items: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG] key=value ...`` in any order: the one item without ``=`` is the config (or task)."""
    from .errors import ConfigError

    plain = [x for x in items if "=" not in x]
    if len(plain) > 1:
        raise ConfigError(f"more than one config/task given: {plain}; overrides are key=value")
    return (plain[0] if plain else None), [x for x in items if "=" in x]


# ---------------------------------------------------------------------------------------------------- train
class _Progress:
    """tqdm bar with loss / lr / speed (the CLI's view of a run; the library never prints)."""

    def __init__(self):
        self.bar = None

    def on_train_begin(self, info):
        from tqdm.auto import tqdm

        _out(f"task {info['task']} | model {info['model']} | method {info['method']} | "
             f"{info['trainable_params']:,} trainable of {info['total_params']:,} params | "
             f"{info['train_rows']} train / {info['eval_rows']} held-out rows | device {info['device']}")
        self.bar = tqdm(total=info["steps"], initial=info["start_step"], desc="train", unit="step",
                        dynamic_ncols=True, file=sys.stderr)

    def on_step(self, step, logs):
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}", tok_s=f"{logs['tokens_per_s']:.0f}")

    def on_eval(self, phase, metrics):
        if phase != "before" and self.bar is not None:
            self.bar.close()
            self.bar = None
        _out(f"eval ({phase}): " + ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))

    def on_train_end(self, result):
        if self.bar is not None:
            self.bar.close()


def cmd_train(a) -> int:
    from .train import TrainingInterrupted, resolve, run_training

    path, overrides = _split_config_args(a.args)
    cfg = resolve(path, overrides, a.method)
    try:
        r = run_training(cfg, resume=a.resume, callbacks=[_Progress()])
    except TrainingInterrupted as e:
        _out(f"\ninterrupted at step {e.step}; checkpoint saved to {e.checkpoint}\n"
             f"continue with: lorakit train {' '.join(a.args)}{' --method ' + a.method if a.method else ''} --resume")
        return 130
    if int(os.environ.get("RANK", "0") or 0) != 0:  # torchrun / accelerate launch: rank 0 reports
        return 0
    b, f = r["metrics_before"], r["metrics_after"]
    keys = [k for k in f if not k.endswith("_n")]
    rows = [[k, _fmt(b.get(k, "")) if b else "-", _fmt(f[k]),
             (f"{f[k] - b[k]:+.4f}" if b and isinstance(b.get(k), float) else "")] for k in keys]
    _out(f"\nheld-out results ({r['eval_rows']} rows, {r['task']}):")
    _out(_table(rows, ["metric", "before", "after", "change"]))
    _out(f"\n{r['steps']} steps in {r['train_time_s']:.1f}s ({r['time_per_step_s']:.2f}s/step, "
         f"{r['tokens_per_s']:.0f} tokens/s), wall {r['wall_time_s']:.1f}s, peak RSS {r['peak_rss_mb']:.0f} MB")
    _out(f"adapter (PEFT format): {r['adapter_dir']}\nmetrics: {Path(r['output_dir']) / 'metrics.jsonl'}   "
         f"config: {Path(r['output_dir']) / 'config.yaml'}")
    _out(f"try it: lorakit eval --adapter {r['adapter_dir']}")
    return 0


# ---------------------------------------------------------------------------------------------------- eval
def _run_config_for(adapter: Path):
    for p in (adapter / "config.yaml", adapter.parent / "config.yaml", adapter.parent.parent / "config.yaml"):
        if p.is_file():
            return p
    return None


def cmd_eval(a) -> int:
    from .errors import ConfigError
    from .io import load_adapter, read_adapter_config
    from .train import resolve, seed_everything

    adapter = Path(a.adapter)
    read_adapter_config(adapter)
    task, overrides = _split_config_args(a.args)
    rc = _run_config_for(adapter)
    cfg = resolve(rc, overrides) if rc else resolve(None, overrides)
    if task:
        cfg.data.task = task
    elif rc is None:
        raise ConfigError(f"no config.yaml next to {adapter}: name the task (lorakit eval --adapter DIR TASK)")
    from .tasks import get_task

    t = get_task(cfg.data.task, cfg.data)
    rows = t.rows()
    seed_everything(cfg.train.seed)
    model, tok = t.load_model(t.model_name(cfg.model.name), cfg.model.dtype)
    ex = t.encode(rows["eval"], tok)
    res = []
    if a.base:
        res.append(("base", t.evaluate(model, tok, ex, cfg.data.eval_batch_size)))
    load_adapter(model, adapter)
    res.append(("adapter", t.evaluate(model, tok, ex, cfg.data.eval_batch_size)))
    keys = list(res[-1][1])
    _out(f"{t.name}: {len(ex)} held-out rows ({cfg.data.eval_split if not cfg.data.path else 'your data'})")
    _out(_table([[k] + [_fmt(m[k]) for _, m in res] for k in keys], ["metric"] + [n for n, _ in res]))
    return 0


# ---------------------------------------------------------------------------------------------------- generate
def cmd_generate(a) -> int:
    import threading

    import torch
    from transformers import TextIteratorStreamer

    from . import assets
    from .io import load_adapter, read_adapter_config
    from .train import resolve

    model_name = a.model
    if a.adapter:
        conf = read_adapter_config(a.adapter)
        rc = _run_config_for(Path(a.adapter))
        if model_name is None and rc is not None:
            model_name = resolve(rc).model.name
        model_name = model_name or conf.get("base_model_name_or_path")
    model, tok = assets.load_causal_lm(model_name or "smollm2-135m")
    if a.adapter:
        load_adapter(model, a.adapter)
    text = a.prompt
    if a.chat and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                       add_generation_prompt=True)
    enc = tok(text, return_tensors="pt")
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    kw = dict(**enc, max_new_tokens=a.max_new_tokens, streamer=streamer, pad_token_id=tok.pad_token_id,
              do_sample=a.temperature > 0)
    if a.temperature > 0:
        kw["temperature"] = a.temperature
    th = threading.Thread(target=lambda: torch.no_grad()(model.generate)(**kw), daemon=True)
    th.start()
    for piece in streamer:
        sys.stdout.write(piece)
        sys.stdout.flush()
    th.join()
    sys.stdout.write("\n")
    return 0


# ---------------------------------------------------------------------------------------------------- methods
def methods_markdown() -> str:
    from .catalog import methods_markdown as md

    return md()


def _method_rows() -> list[dict]:
    from . import list_methods

    return list_methods()


def _write_markdown(dest: str, md: str) -> int:
    """``--markdown``: to stdout ("-") or to a file."""
    if dest == "-":
        sys.stdout.write(md)
    else:
        Path(dest).write_text(md)
        _out(f"wrote {dest}")
    return 0


def cmd_methods(a) -> int:
    if a.markdown is not None:
        return _write_markdown(a.markdown, methods_markdown())
    rows = [[m["name"], m["family"], "yes" if m["mergeable"] else "no", m["peft_type"] or "-", m["init"],
             ",".join(m["layers"]), m["calibration"] or "-", m["paper"][:60]] for m in _method_rows()]
    _out(_table(rows, ["method", "family", "merge", "peft", "init", "layers", "calib", "paper"]))
    return 0


def cmd_procedures(a) -> int:
    from .procedures import list_procedures, procedures_markdown

    if a.markdown is not None:
        return _write_markdown(a.markdown, procedures_markdown())
    rows = [[r["name"], r["family"], r["paper"][:50] or "-",
             ", ".join(f"{k}={v!r}" for k, v in r["options"].items())[:70] or "-"] for r in list_procedures()]
    _out(_table(rows, ["procedure", "family", "paper", "options (optim.<option>=...)"]))
    return 0


# ---------------------------------------------------------------------------------------------------- inspect
def parse_targets(values: list[str] | None):
    """``all-linear`` | ``all-attention`` | a regex (has regex characters) | names (comma/space separated) -> a targets spec."""
    if not values:
        return None
    if len(values) == 1:
        v = values[0]
        if v in ("all-linear", "all-attention"):
            return v
        if any(c in v for c in "*+?[](){}|^$\\"):
            return v
        return [x for x in v.split(",") if x]
    return [x for v in values for x in v.split(",") if x]


def _meta_model(name: str):
    import torch

    from . import assets

    if name == "mobilenet-v2":
        with torch.device("meta"):
            return assets.MobileNetV2()
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    path = assets.model_path(name)
    conf = AutoConfig.from_pretrained(path)
    arch = (conf.architectures or [""])[0]
    with torch.device("meta"):
        if arch.endswith("ForCausalLM"):
            return AutoModelForCausalLM.from_config(conf)
        return AutoModel.from_config(conf)


def cmd_inspect(a) -> int:
    from collections import Counter

    from .core import adaptable
    from .targets import default_targets, match

    model = _meta_model(a.model)
    targets = parse_targets(a.targets)
    if targets is None:
        try:
            _out(f"no --targets: using the architecture default {default_targets(model)}")
        except Exception:  # noqa: BLE001 - show the choices instead
            pass
    paths = match(model, targets, parse_targets(a.exclude), a.layers)
    rows = []
    for p in paths:
        m = model.get_submodule(p)
        rows.append([p, type(m).__name__, adaptable(m), "x".join(str(s) for s in m.weight.shape)])
    if not a.summary:
        _out(_table(rows, ["module", "type", "kind", "weight"]))
    by_name = Counter(p.rsplit(".", 1)[-1] for p in paths)
    n_adapt = sum(1 for _, m in model.named_modules() if adaptable(m))
    _out(f"\n{len(paths)} of {n_adapt} adaptable modules matched: " +
         ", ".join(f"{k} x{v}" for k, v in by_name.items()))
    return 0


# ---------------------------------------------------------------------------------------------------- extract
def cmd_extract(a) -> int:
    from .extract import extract_lora, load_pretrained

    base, tuned = load_pretrained(a.base), load_pretrained(a.tuned)
    ex = extract_lora(base, tuned, rank=a.rank, energy=a.energy, max_rank=a.max_rank,
                      targets=parse_targets(a.targets), exclude=parse_targets(a.exclude))
    out = ex.save(a.out)
    rows = [[p, ex.ranks[p], f"{ex.energy[p]:.4f}", f"{ex.errors[p]:.3g}", "yes" if ex.biases[p] is not None else ""]
            for p in ex.factors]
    _out(_table(rows, ["module", "rank", "energy kept", "rel. error", "bias"]))
    if ex.skipped:
        _out(f"\nnot expressible as a LoRA on linear layers (left at the base values): {', '.join(ex.skipped)}")
    _out(f"\nwrote a PEFT LoRA on {len(ex.factors)} layers to {out}")
    return 0


def cmd_continual(a) -> int:
    import json

    from .continual import ContinualConfig, run_sequence

    cfg = ContinualConfig(mode=a.mode, steps_per_task=a.steps, batch_size=a.batch_size, lr=a.lr,
                          procedure=a.optim, buffer_size=a.buffer, eval_size=a.eval_size, seed=a.seed)
    cfg.validate()
    adapter = {"method": a.method, "targets": parse_targets(a.targets) or ["q_proj", "k_proj", "v_proj", "o_proj"],
               "r": a.r, "alpha": 2 * a.r}
    res = run_sequence(cfg, adapter, tuple(a.tasks.split(",")), max_length=a.max_length)
    rows = [[f"after {res['tasks'][i]}", *[f"{v:.3f}" for v in r]] for i, r in enumerate(res["R"])]
    _out(_table(rows, ["", *res["tasks"]]))
    _out(f"\n{a.mode}: average accuracy {res['avg_acc']:.3f}, forgetting {res['forgetting']:.3f}")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


def cmd_loram(a) -> int:
    from . import loram
    from .errors import ConfigError

    if a.action == "prune":
        out, mask = loram.prune_files(a.model, a.ratio, a.out)
        n = sum(1 for e in mask.modules.values() if e["out"] is not None or e["in"] is not None)
        _out(f"pruned {a.ratio:.0%} of the kv-head groups and MLP channels ({n} matrices narrowed): {out}\n"
             f"train on it:  lorakit train <recipe> model.name={out}\n"
             f"then:         lorakit loram recover --pruned {out} --adapter <run>/adapter --base {a.model} "
             "--out <dir>")
        return 0
    if not a.pruned or not a.adapter:
        raise ConfigError("lorakit loram recover needs --pruned DIR (the pruned model) and --adapter DIR (trained on it)")
    out = loram.recover_files(a.pruned, a.adapter, a.base, a.out, fill=a.fill)
    _out(f"wrote the recovered LoRA for {a.base} to {out}")
    return 0


# ---------------------------------------------------------------------------------------------------- assets
def cmd_assets(a) -> int:
    from . import assets

    if a.action == "prepare":
        for name, where in assets.prepare(a.names or None).items():
            _out(f"{name}: {where}")
        return 0
    _out(f"cache: {assets.cache_dir()}  (set LORAKIT_CACHE to move it)")
    rows = [[x["kind"], x["name"], x["status"], x.get("split", ""), x["description"]] for x in assets.list_assets()]
    _out(_table(rows, ["kind", "name", "status", "split", "description"]))
    missing = [x for x in assets.list_assets() if x["status"] != "ready"]
    for x in missing:
        _out(f"  {x['name']}: {x['install']}")
    return 0


# ---------------------------------------------------------------------------------------------------- recipes
def cmd_federate(a) -> int:
    """Federated fine-tuning of one adapter over K clients on Flower (simulation or deployment engine)."""
    from .federated import resolve_federated
    from .federated.engines import run_federated

    path, overrides = _split_config_args(a.args)
    fc = resolve_federated(path, overrides)  # everything validated before any model loads
    res = run_federated(fc)
    rows = []
    for h in res["history"]:
        ev = res["eval"].get(str(h["round"]), {})
        rows.append([h["round"], _fmt(ev.get("accuracy", float("nan"))), _fmt(h["agg_error"]), h["bytes_up"],
                     h["bytes_down"]])
    _out(_table(rows, ["round", "accuracy", "agg_error", "bytes_up", "bytes_down"]))
    _out(f"strategy {res['strategy']} on the {res['engine']} engine, {res['clients']} clients; adapter: "
         f"{res['adapter_dir']}")
    return 0


def cmd_recipes(a) -> int:
    from .errors import ConfigError
    from .train.config import RECIPES_DIR, list_recipes

    recipes = list_recipes()
    from .federated.config import FEDERATED_RECIPES
    from .train.config import _describe

    recipes += [{"kind": "federated", "name": p.stem, "path": p, "description": _describe(p)}
                for p in sorted(FEDERATED_RECIPES.glob("*.yaml"))]
    if a.name:
        hit = [r for r in recipes if r["name"] == a.name or f"{r['kind']}s/{r['name']}" == a.name
               or (r["kind"] == "method" and f"methods/{r['name']}" == a.name)
               or (r["kind"] == "federated" and a.name in (f"federated/{r['name']}", f"federated-{r['name']}"))]
        if not hit:
            raise ConfigError(f"no packaged recipe '{a.name}'; known: {', '.join(r['name'] for r in recipes)}")
        sys.stdout.write(hit[0]["path"].read_text(encoding="utf-8"))
        return 0
    _out(f"packaged recipes ({RECIPES_DIR}):")
    _out(_table([[r["name"], r["description"][:90]] for r in recipes if r["kind"] == "recipe"],
                ["recipe (lorakit train NAME)", "description"]))
    _out("")
    _out(_table([[r["name"], r["description"][:90]] for r in recipes if r["kind"] == "method"],
                ["method file (--method NAME)", "description"]))
    _out("")
    _out(_table([[r["name"], r["description"][:90]] for r in recipes if r["kind"] == "federated"],
                ["federated (lorakit federate NAME)", "description"]))
    merges = [[r["name"], r["description"][:90]] for r in recipes if r["kind"] == "merge"]
    if merges:
        _out("")
        _out(_table(merges, ["merge config (lorakit merge FILE)", "description"]))
    return 0


# ---------------------------------------------------------------------------------------------------- arena
def _csv(v: str | None) -> list[str] | None:
    return [x.strip() for x in v.split(",") if x.strip()] if v else None


def _arena_plan(a):
    from .arena import DEFAULT_TASKS, ArenaPlan
    from .arena.run import BASELINE
    from .core import REGISTRY
    from .procedures import DEFAULT_PROCEDURE
    from .errors import ConfigError

    from .arena.run import _import_plugins

    _import_plugins(_csv(a.plugins) or [])  # before listing the registry: plugin methods join the default set
    methods = _csv(a.methods) or sorted(REGISTRY)
    try:
        seeds = [int(x) for x in _csv(a.seeds) or ["0", "1", "2"]]
    except ValueError:
        raise ConfigError(f"--seeds takes comma-separated integers, got {a.seeds!r}") from None
    shard = None
    if a.shard:
        try:
            i, n = (int(x) for x in a.shard.split("/"))
        except ValueError:
            raise ConfigError(f"--shard takes i/N (e.g. 0/4), got {a.shard!r}") from None
        shard = (i, n)
    return ArenaPlan(methods=methods, tasks=_csv(a.tasks) or list(DEFAULT_TASKS), seeds=seeds, budget=a.budget,
                     out=Path(a.out), match_params=not a.no_match, lr_sweep=not a.no_lr_sweep, extra=list(a.set),
                     isolate=a.isolate, timeout_s=a.timeout, plugins=_csv(a.plugins) or [],
                     lr_policy=a.lr, procedures=_csv(a.procedures) or [DEFAULT_PROCEDURE], shard=shard,
                     backend=a.backend, ray_address=a.ray_address, diagnostics=not a.no_diagnostics,
                     lr_tuning=a.tune_lr, baseline=a.baseline or BASELINE, rediagnose=_csv(a.rediagnose) or [])


def cmd_arena(a) -> int:
    from .arena import read_records, write_report

    if a.action == "report":
        md, page = write_report(a.out, compare=a.compare)
        _out(f"wrote {md} and {page}")
        if a.readme:
            from .arena import aggregate
            from .arena.report import update_readme

            link = os.path.relpath(md, Path(a.readme).resolve().parent)
            if not update_readme(a.readme, aggregate(read_records(a.out)), link):
                from .errors import ConfigError

                raise ConfigError(f"{a.readme} has no '<!-- arena:begin -->' ... '<!-- arena:end -->' markers")
            _out(f"updated the arena table in {a.readme}")
        return 0
    plan = _arena_plan(a)
    if a.action == "plan":
        from .arena.run import budgets, expand, validate

        validate(plan)
        table = budgets(plan)
        rows = []
        for (task, method), (adapter, info) in sorted(table.items()):
            knob = info.get("knob")
            rows.append([task, method, f"{knob}={info['value']}" if info.get("matched") and knob else
                         ("(recipe)" if method == plan.baseline else "-"), info.get("trainable"), info.get("target"),
                         "yes" if info.get("matched") else "no", info.get("skip") or info.get("reason") or ""])
        _out(_table(rows, ["task", "method", "knob", "trainable", f"{plan.baseline} target", "matched", "note"]))
        done = {r["key"] for r in read_records(plan.out)}
        runs = expand(plan)
        _out(f"\n{len(runs)} runs planned, {sum(r['key'] in done for r in runs)} already recorded in {plan.out}")
        if plan.lr_tuning:
            cells = {(r["task"], r["method"], r["procedure"]) for r in runs}
            _out(f"--tune-lr: plus 1-2 + 2 learning-rate sweep runs for each of the {len(cells)} cells, and up to "
                 f"{plan.lr_extend} more where the best rate is at an open edge of those tried "
                 f"({sum(r.get('phase') == 'sweep' for r in read_records(plan.out))} recorded); the tune seed's run "
                 "of a cell reuses its sweep run at the chosen rate (LoRA's is trained: it also scores the untrained "
                 "model)")
        from .arena.run import machine_time

        t = machine_time(plan)
        eta = "unknown until a run is recorded" if t["left_s"] is None else \
            f"~{t['left_s'] / 3600:.1f} h in one process at the recorded mean per task (divide by the processes)"
        _out(f"machine time: {t['spent_s'] / 3600:.1f} h spent on {t['trained']} runs; {t['left']} runs left: {eta}")
        return 0
    from .arena import run_arena
    from .arena.run import records_file

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.getLogger("lorakit").setLevel(logging.WARNING)
    new = run_arena(plan, progress=not a.quiet)
    ok = sum(r["status"] == "ok" for r in new)
    _out(f"{len(new)} runs recorded in {plan.out / records_file(plan)} ({ok} ok, {len(new) - ok} failed or skipped)")
    if new and not a.no_report:
        md, page = write_report(plan.out)
        _out(f"report: {md} and {page}")
    return 0


# ---------------------------------------------------------------------------------------------------- main
COMMANDS = {
    "train": (cmd_train, "fine-tune an adapter (no arguments: the SmolLM2 sentiment demo)"),
    "eval": (cmd_eval, "evaluate a trained adapter on its task's held-out data"),
    "generate": (cmd_generate, "generate text with a base model + adapter (streams tokens)"),
    "methods": (cmd_methods, "list the registered PEFT methods"),
    "procedures": (cmd_procedures, "list the registered training procedures (optim.name=...)"),
    "inspect": (cmd_inspect, "show which modules of a model a target spec matches"),
    "assets": (cmd_assets, "list / prepare the offline models and datasets"),
    "continual": (cmd_continual, "continual learning over sentiment -> BBC News -> GSM8K (I-LoRA, replay, sequential)"),
    "loram": (cmd_loram, "LoRAM: prune a model to train LoRA on it, then recover the adapter for the full model"),
    "extract": (cmd_extract, "extract a PEFT LoRA approximating a fully fine-tuned model (truncated SVD)"),
    "arena": (cmd_arena, "compare every method on the same real tasks under the same budget"),
    "recipes": (cmd_recipes, "list the packaged recipes and method files (or print one)"),
    "federate": (cmd_federate, "federated LoRA over K clients on Flower (FedIT, FFA-LoRA, Fed-SB, LoRA-FAIR)"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorakit", description="The LoRA family of PEFT methods: train, evaluate, "
                                "inspect. `lorakit train` with no arguments runs the demo.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    s = {name: sub.add_parser(name, help=h, description=h) for name, (_, h) in COMMANDS.items()}
    for name, (_, _, h) in PASSTHROUGH.items():
        sub.add_parser(name, help=h + f" (see `lorakit {name} --help`)", add_help=False)
    s["train"].add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value]",
                            help="a recipe (a YAML file, or a packaged recipe's name: see `lorakit recipes`) and/or "
                            "overrides such as adapter.r=16 optim.lr=1e-4")
    s["train"].add_argument("--method", help="swap in the method's paper settings (lorakit recipes: methods/NAME.yaml; or just set "
                            "adapter.method)")
    s["train"].add_argument("--resume", action="store_true", help="continue from the last checkpoint in output.dir")
    s["eval"].add_argument("--adapter", required=True, help="adapter directory (output.dir/adapter)")
    s["eval"].add_argument("args", nargs="*", metavar="[TASK] [key=value]")
    s["eval"].add_argument("--base", action="store_true", help="also evaluate the base model without the adapter")
    s["generate"].add_argument("prompt")
    s["generate"].add_argument("--adapter", help="adapter directory")
    s["generate"].add_argument("--model", help="base model (default: the adapter's training config)")
    s["generate"].add_argument("--max-new-tokens", type=int, default=64)
    s["generate"].add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s["generate"].add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    s["methods"].add_argument("--markdown", nargs="?", const="-", default=None, metavar="PATH",
                              help="write the markdown table (docs/methods.md) to PATH, or stdout")
    s["procedures"].add_argument("--markdown", nargs="?", const="-", default=None, metavar="PATH",
                                 help="write docs/procedures.md to PATH, or stdout")
    s["inspect"].add_argument("model", help="smollm2-135m | minilm-l6 | mobilenet-v2 | a local HF model dir")
    s["inspect"].add_argument("--targets", nargs="+", help="all-linear | a regex | names (q_proj,v_proj)")
    s["inspect"].add_argument("--exclude", nargs="+")
    s["inspect"].add_argument("--layers", nargs="+", type=int)
    s["inspect"].add_argument("--summary", action="store_true", help="counts only")
    s["federate"].add_argument("args", nargs="*", metavar="CONFIG.yaml [key=value]",
                               help="a federated recipe (e.g. federated-sentiment-minilm-ffa) and overrides such as "
                               "federated.strategy=fair federated.engine=deployment")
    s["recipes"].add_argument("name", nargs="?", help="print this recipe (e.g. sentiment-minilm-lora, methods/vera)")
    s["assets"].add_argument("action", nargs="?", choices=["list", "prepare"], default="list")
    s["assets"].add_argument("names", nargs="*")
    ex = s["extract"]
    ex.add_argument("--base", required=True, help="the base model directory (save_pretrained)")
    ex.add_argument("--tuned", required=True, help="the fully fine-tuned model directory (same architecture)")
    how = ex.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, help="the rank of every layer")
    how.add_argument("--energy", type=float, help="per layer, the smallest rank keeping this share of ||dW||^2")
    ex.add_argument("--max-rank", type=int, help="with --energy: at most this rank")
    ex.add_argument("--targets", nargs="+", help="only these layers (a regex or names); default: every linear")
    ex.add_argument("--exclude", nargs="+")
    ex.add_argument("--out", required=True, help="the adapter directory to write")
    cl = s["continual"]
    cl.add_argument("--mode", default="ilora", choices=["ilora", "replay", "sequential"])
    cl.add_argument("--tasks", default="sentiment,bbc,gsm8k", help="comma-separated, in order")
    cl.add_argument("--method", default="lora", help="the adapter method (any registered)")
    cl.add_argument("--targets", nargs="+", help="default: q/k/v/o projections")
    cl.add_argument("--r", type=int, default=8)
    cl.add_argument("--optim", default="adamw", help="the training procedure (optim.name)")
    cl.add_argument("--steps", type=int, default=50, help="optimiser steps per task")
    cl.add_argument("--batch-size", type=int, default=8)
    cl.add_argument("--lr", type=float, default=2e-4)
    cl.add_argument("--buffer", type=int, default=500, help="replay buffer size (reservoir)")
    cl.add_argument("--eval-size", type=int, default=100)
    cl.add_argument("--max-length", type=int, default=128)
    cl.add_argument("--seed", type=int, default=0)
    cl.add_argument("--out", help="write the result JSON here")
    lm = s["loram"]
    lm.add_argument("action", choices=["prune", "recover"],
                    help="prune: write a structurally pruned copy; recover: scatter its adapter into the full model")
    lm.add_argument("--model", default="smollm2-135m", help="prune: the model to prune (name or HF directory)")
    lm.add_argument("--ratio", type=float, default=0.5, help="prune: fraction of kv groups and channels removed")
    lm.add_argument("--pruned", help="recover: the pruned directory (holds loram_mask.json)")
    lm.add_argument("--adapter", help="recover: the adapter trained on the pruned model")
    lm.add_argument("--base", default="smollm2-135m", help="recover: the full model (name or HF directory)")
    lm.add_argument("--fill", default="zeroA", choices=["zeroA", "normA"], help="recover: pruned columns of A")
    lm.add_argument("--out", required=True, help="the directory to write")
    ar = s["arena"]
    ar.add_argument("action", choices=["run", "report", "plan"],
                    help="run: train and record (resumes); report: Markdown + HTML; plan: the matched budgets")
    ar.add_argument("--methods", help="comma-separated (default: every registered method)")
    ar.add_argument("--tasks", help="comma-separated: sentiment-minilm, bbc-minilm, sentiment-smollm2, "
                    "gsm8k-smollm2 (default: the first three)")
    ar.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    ar.add_argument("--budget", default="default", help="default (recipe: ~1-3 min/run) | quick | smoke | N steps")
    ar.add_argument("--out", default="arena/results", help="results directory (runs.jsonl, report.md, report.html)")
    ar.add_argument("--procedures", help="comma-separated training procedures, a second axis (default: adamw)")
    ar.add_argument("--shard", help="i/N: run only this shard's cells (N processes or machines share --out; one "
                    "`arena report` joins them)")
    ar.add_argument("--backend", default="local", choices=["local", "ray"],
                    help="local: one run at a time here; ray: every run a task on a Ray cluster")
    ar.add_argument("--ray-address", help="the Ray cluster (default: 'auto', else a local instance)")
    ar.add_argument("--no-diagnostics", action="store_true",
                    help="skip the per-run intruder count and forgetting perplexity")
    ar.add_argument("--rediagnose", metavar="METHODS",
                    help="comma-separated: run these methods' recorded test runs again where their diagnostics "
                    "predate the current measurement (the new record replaces the old; training is seeded)")
    ar.add_argument("--tune-lr", action="store_true",
                    help="per (task, method, procedure): choose the rate on the validation split (first seed; the "
                    "paper and recipe rates, then x0.5/x2 of the better, then up to 3 more x2 steps while the best is at an "
                    "open edge of the rates tried), then run the seeds at it on test")
    ar.add_argument("--baseline", help="the method every other is matched to (trainable parameters) and compared "
                    "against (default: lora)")
    ar.add_argument("--no-match", action="store_true", help="run paper settings without matching the budget")
    ar.add_argument("--no-lr-sweep", action="store_true", help="the baseline at the recipe's rate only")
    ar.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    ar.add_argument("--isolate", default="fork", choices=["fork", "spawn", "none"],
                    help="each run in a forked (default) or fresh process, or in this one")
    ar.add_argument("--lr", default="paper", choices=["paper", "recipe"],
                    help="paper: each method's rate from its packaged method file (default); recipe: the task's rate for all")
    ar.add_argument("--plugins", help="comma-separated modules to import first (they register your own methods)")
    ar.add_argument("--timeout", type=float, default=3600.0, help="seconds per run before it is killed")
    ar.add_argument("--no-report", action="store_true", help="do not write the report after running")
    ar.add_argument("--compare", metavar="DIR", help="report: also set each method against its runs in another "
                    "results directory on the same seeds (e.g. --lr recipe against the paper rates)")
    ar.add_argument("--readme", help="report: also put the overview table between the arena markers of this file")
    ar.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


PASSTHROUGH = {  # subcommands with their own argument parsers
    "serve": ("lorakit.serve.server", "serve_main", "OpenAI-compatible server: many adapters on one base model"),
    "export": ("lorakit.serve.export", "export_main", "export an adapter for vLLM (PEFT) or llama.cpp (GGUF)"),
    "merge": ("lorakit.merging.cli", "merge_main", "merge adapters (mergekit-style YAML) into a PEFT adapter or a model"),
    "temp-lora": ("lorakit.workflows.cli", "temp_lora_main",
                  "Temp-Lora: perplexity / generation with a temporary adapter trained chunk by chunk"),
    "transfer": ("lorakit.workflows.cli", "transfer_main",
                 "Trans-LoRA: transfer a classification adapter to a new base model via filtered synthetic data"),
}


def main(argv: list[str] | None = None) -> int:
    from .errors import LorakitError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:
        import importlib

        mod, fn, _ = PASSTHROUGH[argv[0]]
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            return getattr(importlib.import_module(mod), fn)(argv[1:])
        except LorakitError as e:
            print(f"lorakit {argv[0]}: error: {e}", file=sys.stderr)
            return 2
    parser = build_parser()
    # options and positionals in any order (`train recipe.yaml --method dora key=value`): argparse stops a
    # positional list at the first option, so the positionals after it come back as extras and are appended
    a, extra = parser.parse_known_args(argv)
    if extra:
        if a.cmd not in ("train", "eval", "federate") or any(x.startswith("-") for x in extra):
            parser.parse_args(argv)  # the usual "unrecognized arguments" error, exit 2
        a.args = list(a.args) + extra
    if a.cmd is None:
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(levelname)s %(name)s: "
                        "%(message)s" if a.verbose else "%(message)s")
    for noisy in ("httpx", "urllib3", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if int(os.environ.get("RANK", "0") or 0) != 0 and not a.verbose:  # torchrun: rank 0 tells the story
        logging.getLogger().setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.cmd in ("train", "eval", "generate"):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one bar (ours) is enough
    try:
        return COMMANDS[a.cmd][0](a)
    except LorakitError as e:
        print(f"lorakit {a.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorakit {a.cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
