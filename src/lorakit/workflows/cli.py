"""``lorakit temp-lora`` and ``lorakit transfer``: the workflows as jobs, configured by a workflow recipe
(``lorakit/recipes/workflows/NAME.yaml``, or your own YAML file) and ``key=value`` overrides.

  lorakit temp-lora perplexity [RECIPE] [key=value ...] [--json PATH]
  lorakit temp-lora generate   [RECIPE] --prompt TEXT [--max-new-tokens N] [--no-train] [key=value ...]
  lorakit transfer             [RECIPE] transfer.source_adapter=DIR [key=value ...] [--baseline-only]
                               [--stage all|synthesize|distil]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..config import apply_overrides, load_yaml
from ..errors import ConfigError

WORKFLOW_RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "workflows"


def workflow_recipe(path: str | None, default: str, sections: tuple[str, ...], overrides: list[str]) -> dict:
    """A workflow recipe (a file, or a packaged name under recipes/workflows) with overrides applied; only
    ``sections`` are allowed at the top level."""
    name = path or default
    p = Path(name)
    if not p.is_file():
        stem = p.name[:-5] if p.name.endswith(".yaml") else p.name
        p = WORKFLOW_RECIPES / f"{stem}.yaml"
        if not p.is_file():
            known = ", ".join(sorted(x.stem for x in WORKFLOW_RECIPES.glob("*.yaml")))
            raise ConfigError(f"workflow recipe not found: {name} (packaged: {known})")
    data = load_yaml(p)
    apply_overrides(data, overrides)
    bad = [k for k in data if k not in sections]
    if bad:
        raise ConfigError(f"{p}: unknown section '{bad[0]}'; valid sections: {', '.join(sections)}")
    return data


def _split(items: list[str]) -> tuple[str | None, list[str]]:
    plain = [x for x in items if "=" not in x]
    if len(plain) > 1:
        raise ConfigError(f"more than one recipe given: {plain}; overrides are key=value")
    return (plain[0] if plain else None), [x for x in items if "=" in x]


# ------------------------------------------------------------------------------------------------ temp-lora
def _text(sec: dict) -> str:
    from .. import assets

    sec = dict(sec or {})
    if sec.get("file"):
        return assets._read_utf8(Path(sec["file"]))
    docs = assets.load_text(sec.get("name", "shakespeare"))
    split = sec.get("split", "test")
    if split not in docs:
        raise ConfigError(f"text.split={split!r}; valid: {', '.join(docs)}")
    i = int(sec.get("document", 0))
    if not 0 <= i < len(docs[split]):
        raise ConfigError(f"text.document={i}: the {split} split has {len(docs[split])} documents")
    return docs[split][i]


def temp_lora_main(argv: list[str]) -> int:
    from .. import assets
    from . import temp_lora

    ap = argparse.ArgumentParser(prog="lorakit temp-lora", description="Temp-Lora: a temporary adapter trained on "
                                 "the text so far, chunk by chunk, with a short context window (removed afterwards)")
    ap.add_argument("action", choices=["perplexity", "generate"])
    ap.add_argument("args", nargs="*", metavar="[RECIPE] [key=value]",
                    help="default recipe: temp-lora (sections model, temp_lora, text)")
    ap.add_argument("--prompt", help="generate: the prompt")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--no-train", action="store_true", help="generate with the same window but no Temp-Lora")
    ap.add_argument("--sample", action="store_true", help="generate: sample instead of greedy")
    ap.add_argument("--json", help="write the result as JSON here")
    a = ap.parse_args(argv)
    path, ov = _split(a.args)
    data = workflow_recipe(path, "temp-lora", ("model", "temp_lora", "text"), ov)
    cfg = temp_lora.make_config(data.get("temp_lora"))  # validated before the model loads
    msec = data.get("model") or {}
    if a.action == "generate" and not a.prompt:
        raise ConfigError("lorakit temp-lora generate needs --prompt TEXT")
    text = _text(data.get("text")) if a.action == "perplexity" else None
    if msec.get("threads"):
        import torch

        torch.set_num_threads(int(msec["threads"]))
    model, tok = assets.load_causal_lm(msec.get("name", "smollm2-135m"), msec.get("dtype", "float32"))
    show = lambda r: print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}),  # noqa: E731
                           flush=True)
    if a.action == "perplexity":
        r = temp_lora.perplexity(model, tok, text, cfg, max_tokens=(data.get("text") or {}).get("max_tokens"),
                                 on_chunk=show)
        print(f"\n{r['tokens']} tokens in {r['chunks']} chunks of {cfg.chunk}, window {cfg.window}: perplexity "
              f"{r['base_ppl']:.3f} without Temp-Lora -> {r['ppl']:.3f} with Temp-Lora "
              f"({100 * (r['ppl'] / r['base_ppl'] - 1):+.1f}%)")
    else:
        r = temp_lora.generate(model, tok, a.prompt, a.max_new_tokens, cfg, train=not a.no_train,
                               do_sample=a.sample, on_chunk=show)
        print("\n" + r["text"])
    if a.json:
        tmp = Path(a.json + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(r, indent=2, default=float))
        os.replace(tmp, a.json)
    return 0


# ------------------------------------------------------------------------------------------------ transfer
def transfer_main(argv: list[str]) -> int:
    from . import transfer

    ap = argparse.ArgumentParser(prog="lorakit transfer", description="Trans-LoRA: move a classification adapter "
                                 "to a new base model with synthetic, discriminator-filtered, teacher-labelled data")
    ap.add_argument("args", nargs="*", metavar="[RECIPE] [key=value]",
                    help="default recipe: transfer-sentiment (section transfer); set transfer.source_adapter=DIR")
    ap.add_argument("--baseline-only", action="store_true",
                    help="only the comparison: the student trained on the target base on the seeds alone")
    ap.add_argument("--stage", choices=["all", "synthesize", "distil"], default="all",
                    help="synthesize: steps 1-3 only (no teacher needed); distil: steps 4-5 from an earlier synthesis")
    a = ap.parse_args(argv)
    path, ov = _split(a.args)
    data = workflow_recipe(path, "transfer-sentiment", ("transfer",), ov)
    if a.stage == "synthesize":
        r = transfer.synthesize(data.get("transfer") or {}, log_fn=lambda m: print(m, flush=True))
        print(f"synthetic set: {r['kept']} of {r['candidates']} candidates kept ({r['passed_threshold']} passed the "
              "threshold); continue with --stage distil")
        return 0
    if a.baseline_only:
        b = transfer.run_baseline(data.get("transfer") or {})
        print(f"target base {b['target_model']}: held-out accuracy {b['target_base'].get('accuracy', float('nan')):.3f}"
              f" -> {b['baseline_seeds']['accuracy']:.3f} trained on the {b['seeds']} seeds alone")
        return 0
    run = transfer.distil if a.stage == "distil" else transfer.transfer
    s = run(data.get("transfer") or {}, log_fn=lambda m: print(m, flush=True))
    acc = lambda m: f"{m['accuracy']:.3f}" if m else "-"  # noqa: E731
    print(f"\nheld-out accuracy ({s['task']}): source + adapter {acc(s['source'])} | target base "
          f"{acc(s['target_base'])} | target + transferred adapter {acc(s['student'])} | target trained on the "
          f"{s['seeds']} seeds {acc(s.get('baseline_seeds'))}")
    print(f"synthetic: {s['kept']} of {s['candidates']} candidates kept; adapter: {s['student_adapter']}; "
          f"summary: {Path(s['out']) / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(temp_lora_main(sys.argv[1:]))
