#!/usr/bin/env bash
# Speed/memory benchmark on a GPU (issue 8): run from the repo root with the package importable (PYTHONPATH or an
# installed venv) and bitsandbytes/peft/transformers installed. Writes everything under $OUT: one JSON + log per
# variant, and summary.md (all variants against the baseline of the first run). Each variant runs in its own
# process with a timeout, so one failure or hang loses only itself; the whole script stays under BUDGET seconds.
set -u
OUT=${OUT:?set OUT to the output folder}
BUDGET=${BUDGET:-470}            # seconds for all variants together (the device allows 600 per command)
PY=${PYTHON:-$(command -v python || command -v python3)}
export LIT_LLAMA_LAB_CACHE=${LIT_LLAMA_LAB_CACHE:-/tmp/llcache} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
mkdir -p "$OUT"
START=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; "$PY" -c "import torch; print(torch.__version__, torch.version.cuda)"; } > "$OUT/env.txt" 2>&1

# run NAME TIMEOUT ARGS...: one variant, its own process, bounded by TIMEOUT and by what is left of BUDGET
run() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  (( left < limit )) && limit=$left
  if (( limit < 30 )); then echo "skip $name: budget spent" | tee -a "$OUT/summary.log"; return; fi
  echo "== $name (timeout ${limit}s): $*" | tee -a "$OUT/summary.log"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$PY" -m lit_llama_lab.cli bench --output "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
  echo "   rc=$? in $(( $(date +%s) - t0 ))s" | tee -a "$OUT/summary.log"
  grep -E '^\|' "$OUT/$name.log" | tee -a "$OUT/summary.log"
}

# the random-weight 1B model is written to the cache once, before the variants race for it
timeout 150 "$PY" -c "from lit_llama_lab.bench import shape_model; print(shape_model('llama-3.2-1b'))" > "$OUT/prepare.log" 2>&1 \
  || echo "prepare failed: see prepare.log" | tee -a "$OUT/summary.log"

ONE_B=(--shape llama-3.2-1b --seq_len 2048 --micro_batch 4 --rank 16 --doc_len 512 --steps 20 --warmup 3)
run main      200 "${ONE_B[@]}" --paths baseline,ours --loss_steps 50
run smollm2   150 --shape smollm2-135m --seq_len 2048 --micro_batch 4 --rank 16 --paths baseline,ours,ours+compile --loss_steps 50
run compile   180 "${ONE_B[@]}" --paths ours+compile --loss_steps 50
run attention 150 "${ONE_B[@]}" --paths ours+flex,ours+varlen --loss_steps 50
run mb8       100 "${ONE_B[@]}" --micro_batch 8 --paths ours --real_data false
run nockpt    100 "${ONE_B[@]}" --gradient_checkpointing false --paths ours --real_data false
if "$PY" -c "import liger_kernel" 2>/dev/null; then
  run liger   150 "${ONE_B[@]}" --paths ours+liger,ours+liger+compile --loss_steps 50
else
  echo "skip liger: liger_kernel not importable" | tee -a "$OUT/summary.log"
fi

# one table: every variant against the 1B baseline of `main` (losses: the same SmolLM2 emoji run, 50 steps)
"$PY" - "$OUT" > "$OUT/summary.md" 2>>"$OUT/summary.log" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
runs = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}
base = runs.get("main", {}).get("paths", {}).get("baseline", {})
print(f"device: {next(iter(runs.values()), {}).get('device', '?')}; versions: {next(iter(runs.values()), {}).get('versions')}\n")
print("| run | shape | path | micro-batch | ckpt | tokens/s | × 1B baseline | peak GiB | MFU | held-out loss | Δ loss vs baseline |")
print("|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|")
for run, data in runs.items():
    s = data["settings"]
    for path, r in data["paths"].items():
        if "error" in r:
            print(f"| {run} | {s['shape']} | {path} | {s['micro_batch']} | {s['checkpointing']} | failed: {r['error'][:100]} |||||")
            continue
        same_shape = s["shape"] == "llama-3.2-1b" and "tokens_per_s" in base
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if same_shape else "–"
        if s["shape"] != "llama-3.2-1b" and "baseline" in data["paths"] and "tokens_per_s" in data["paths"]["baseline"]:
            ratio = f"{r['tokens_per_s'] / data['paths']['baseline']['tokens_per_s']:.2f} (own)"
        loss, bl = r.get("held_out_loss"), base.get("held_out_loss")
        delta = f"{(loss - bl) / abs(bl):+.3%}" if loss is not None and bl else "–"
        peak = "–" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "–"
        print(f"| {run} | {s['shape']} | {path} | {s['micro_batch']} | {s['checkpointing']} | {r['tokens_per_s']:,.0f} | "
              f"{ratio} | {peak} | {mfu} | {loss if loss is None else f'{loss:.4f}'} | {delta} |")
PY
cat "$OUT/summary.md"
echo "total $(( $(date +%s) - START ))s"
