#!/usr/bin/env bash
# One short GPU run (< 8 min on one H200) of issue 23's device checks; results as JSON under $OUT:
#   1. bench/job.py --device cuda: the default job (LoRA), DoRA and QLoRA through `lorakit train` vs PEFT + Trainer
#   2. bench/serve.py --device cuda: the adapter bank's gather + bmm vs PEFT's adapter_names loop vs the base /
#      one merged adapter (stages 1-3 and 5; stage 4, 1,000 resident adapters, only with GPU_SERVE_STAGES=12345)
# Usage (repository root):  OUT=/some/dir PY=.venv/bin/python bash bench/gpu.sh
# Needs: torch with CUDA, peft, bitsandbytes (for the QLoRA anchor) and the offline SmolLM2 asset
# (`lorakit assets prepare smollm2-135m`); what is missing is written to $OUT/gpu_env.json and the script stops.
set -u
OUT=${OUT:-bench-gpu-out}
PY=${PY:-python}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
"$PY" - "$OUT/gpu_env.json" <<'PYEOF' || { echo "environment not ready: see $OUT/gpu_env.json"; exit 3; }
import json, sys, importlib.util
env = {"missing": []}
try:
    import torch
    env["torch"] = torch.__version__
    env["cuda"] = torch.cuda.is_available()
    if env["cuda"]:
        env["gpu"] = torch.cuda.get_device_name(0)
    else:
        env["missing"].append("a CUDA device")
except Exception as e:
    env["missing"].append(f"torch ({e})")
for pkg in ("transformers", "peft", "bitsandbytes"):
    if importlib.util.find_spec(pkg) is None:
        env["missing"].append(pkg)
try:
    from lorakit import assets
    env["smollm2"] = str(assets.model_path("smollm2-135m"))
except Exception as e:
    env["missing"].append(f"SmolLM2 asset ({type(e).__name__}: {e})")
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env))
sys.exit(1 if env["missing"] else 0)
PYEOF
nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv > "$OUT/nvidia_smi_before.csv" 2>&1
T0=$(date +%s)
# 1. the job benchmark: one interleaved pair per job (each child ~30-60 s on an H200: load, 2 evals, 40 steps)
timeout 300 "$PY" bench/job.py --device cuda --threads 4 --jobs lora,dora,qlora --reps 1 --json "$OUT/job_cuda.json" \
  > "$OUT/job_cuda.log" 2>&1; echo "job.py rc=$? after $(( $(date +%s) - T0 ))s" | tee -a "$OUT/summary.txt"
# 2. the serving benchmark (bank vs PEFT adapter_names vs base / merged)
timeout 180 "$PY" bench/serve.py --device cuda --threads 4 --reps 5 --gen-tokens 32 --stages "${GPU_SERVE_STAGES:-1235}" \
  --out "$OUT/serve_cuda.json" > "$OUT/serve_cuda.log" 2>&1; echo "serve.py rc=$? after $(( $(date +%s) - T0 ))s" | tee -a "$OUT/summary.txt"
nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv > "$OUT/nvidia_smi_after.csv" 2>&1
tail -n 30 "$OUT/job_cuda.log" "$OUT/serve_cuda.log"
