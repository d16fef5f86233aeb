"""Every registered method under FSDP2 (2 gloo processes) against one process with the same global batch.

    # 1. one process, every method (the reference adapters):
    PYTHONPATH=src python bench/fsdp_methods.py --out /tmp/fsdp-sweep single
    # 2. the same runs under FSDP2 with 2 ranks:
    PYTHONPATH=src python -m torch.distributed.run --nproc-per-node 2 bench/fsdp_methods.py --out /tmp/fsdp-sweep fsdp
    # 3. one process, the same global batches as two accumulated micro-batches of 4 (what each rank computes):
    PYTHONPATH=src python bench/fsdp_methods.py --out /tmp/fsdp-sweep split
    # 4. compare (max |difference| of every adapter tensor, per method):
    PYTHONPATH=src python bench/fsdp_methods.py --out /tmp/fsdp-sweep compare

The model is a tiny Llama built in code (2 blocks, hidden 32), the task a word-level sentiment classification,
4 optimiser steps, each method with the contract suite's options (``r=2`` where it has one, plus its ``example``).
A method that declares ``fsdp_unsupported`` is expected to be refused at config resolution. Used to fill the
table in docs/distributed.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def make_assets(out: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT / "tests" / "train"))
    from conftest import make_rows, tiny_tokenizer  # noqa: E402
    from transformers import LlamaConfig, LlamaForCausalLM

    d, data = out / "tiny", out / "train.jsonl"
    if not (d / "model.safetensors").is_file():
        d.mkdir(parents=True, exist_ok=True)
        tok, v = tiny_tokenizer(d)
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                     pad_token_id=0, eos_token_id=2, bos_token_id=3,
                                     tie_word_embeddings=False)).save_pretrained(d)
        data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(96)))
    return d, data


def method_options(name: str) -> dict:
    from lorakit.core import REGISTRY

    cls = REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    opts = {"r": 2} if "r" in fields else {}
    opts.update(cls.example)
    # no dropout: each rank draws its rows' masks from the same RNG stream, so with dropout the masks (not the
    # maths) differ from one process's; every other difference in the table is then the method's own
    opts.update({f.name: 0.0 for f in dataclasses.fields(cls.Config) if f.init and "dropout" in f.name})
    return opts


def config(name: str, model: Path, data: Path, out: Path, mode: str) -> dict:
    from lorakit.core import REGISTRY

    targets = "all-linear" if "linear" in REGISTRY[name].layers else ["embed_tokens"]  # AdaLink: embeddings only
    return {
        "model": {"name": str(model)},
        "adapter": {"method": name, "targets": targets, "seed": 0, **method_options(name)},
        "optim": {"lr": 1e-2, "warmup": 0.1},
        "data": {"task": "classify-lm", "path": str(data), "max_length": 32, "batch_size": 4 if mode == "split" else 8,
                 "eval_size": 16},
        "train": {"steps": 4, "seed": 0, "eval_before": False, "distributed": "fsdp" if mode == "fsdp" else "none",
                  "threads": 1, "grad_accum": 2 if mode == "split" else 1},
        "output": {"dir": str(out / mode / name)},
    }


def run_all(out: Path, mode: str, only: list[str] | None) -> None:
    import lorakit
    from lorakit.errors import ConfigError
    from lorakit.train import run_training

    model, data = make_assets(out) if mode != "fsdp" or int(os.environ.get("RANK", "0")) == 0 else \
        (out / "tiny", out / "train.jsonl")
    if mode == "fsdp":
        torch.distributed.init_process_group("gloo")
        torch.distributed.barrier()  # rank 0 wrote the assets
    rank = torch.distributed.get_rank() if mode == "fsdp" else 0
    status = {}
    for name in only or lorakit.list_methods():
        name = name if isinstance(name, str) else name["name"]
        try:
            run_training(config(name, model, data, out, mode))
            status[name] = "ok"
        except ConfigError as e:
            status[name] = f"refused: {e}"
        except Exception as e:  # noqa: BLE001 - recorded per method
            status[name] = f"error: {type(e).__name__}: {e}"
            traceback.print_exc()
        if mode == "fsdp":
            torch.distributed.barrier()
        print(f"[{mode} rank {rank}] {name}: {status[name][:200]}", flush=True)
    if rank == 0:
        f = out / f"status-{mode}.json"
        old = json.loads(f.read_text()) if only and f.is_file() else {}  # --methods: update those entries
        f.write_text(json.dumps({**old, **status}, indent=1))
    if mode == "fsdp":
        torch.distributed.destroy_process_group()


def _diff(a: Path, b: Path) -> str:
    from lorakit.io import _read_tensors

    ta, tb = _read_tensors(a), _read_tensors(b)
    if set(ta) != set(tb):
        return "keys differ"
    if any(ta[k].shape != tb[k].shape for k in ta):  # sparse deltas: a support chosen from the run's gradients
        return "support differs"
    return f"{max((ta[k].float() - tb[k].float()).abs().max().item() for k in ta if ta[k].numel()):.1e}"


def compare(out: Path) -> None:
    """Per method: FSDP2 vs one process (same global batch in one micro-batch), FSDP2 vs one process with the
    batch as two accumulated micro-batches (each rank's share), and those two single-process runs against each
    other (how much the method itself depends on the batch split)."""
    st = {m: json.loads((out / f"status-{m}.json").read_text()) for m in ("single", "split", "fsdp")}
    print("| method | FSDP2 (2 ranks) | vs 1 process | vs 1 process, 2 micro-batches | 1 process: 1 vs 2 micro-batches |")
    print("|---|---|---|---|---|")
    for name in sorted(st["single"]):
        s = st["fsdp"].get(name, "missing")
        ok = all(st[m].get(name) == "ok" for m in st)
        d = [_diff(out / "fsdp" / name / "adapter", out / "single" / name / "adapter"),
             _diff(out / "fsdp" / name / "adapter", out / "split" / name / "adapter"),
             _diff(out / "split" / name / "adapter", out / "single" / name / "adapter")] if ok else ["", "", ""]
        print(f"| {name} | {s if len(s) < 80 else s[:80] + '...'} | {d[0]} | {d[1]} | {d[2]} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["single", "split", "fsdp", "compare"])
    ap.add_argument("--out", default="/tmp/fsdp-sweep")
    ap.add_argument("--methods", nargs="*")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.mode == "compare":
        compare(out)
    else:
        run_all(out, a.mode, a.methods)


if __name__ == "__main__":
    main()
