#!/usr/bin/env bash
# Speed/memory benchmark on a GPU (issue 8): run from the repo root with the package importable (PYTHONPATH or an
# installed venv) and bitsandbytes/peft/transformers installed. Writes everything under $OUT: one JSON + log per
# variant, and summary.md (all variants against the baselines of the `main` run). Each variant runs in its own
# process with a timeout, so one failure or hang loses only itself; the whole script stays under BUDGET seconds.
#   STAGE=speed  the Llama-3.2-1B shape, speed and memory only (random weights: needs no SmolLM2 weights)
#   STAGE=speed3 the 1B shape: fp32 activations (now the default) against bf16 (+bf16act), graphed and compiled
#   STAGE=speed4 the 1B shape: the compiled paths (now recomputed whole under checkpointing) against the graphed one
#   STAGE=loss   the 50-step loss check on real emoji chats with SmolLM2 (needs the embedded model)
set -u
OUT=${OUT:?set OUT to the output folder}
BUDGET=${BUDGET:-470}            # seconds for all variants together (the device allows 600 per command)
STAGE=${STAGE:-speed}
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

ONE_B=(--shape llama-3.2-1b --seq_len 2048 --micro_batch 4 --rank 16 --doc_len 512 --steps 20 --warmup 3)
if [ "$STAGE" != loss ]; then  # the random-weight 1B model is written to the cache once, before the variants race
  timeout 150 "$PY" -c "from lit_llama_lab.tools.bench import shape_model; print(shape_model('llama-3.2-1b', '${TOKENIZER:-llama-3.2}'))" \
    > "$OUT/prepare.log" 2>&1 || echo "prepare failed: see prepare.log" | tee -a "$OUT/summary.log"
fi
if [ "$STAGE" = speed ]; then
  run main    260 "${ONE_B[@]}" --real_data false --paths baseline,baseline+amp,ours,ours+graphs,ours+varlen,ours+varlen+graphs
  run compile 200 "${ONE_B[@]}" --real_data false --paths ours+varlen+compile
elif [ "$STAGE" = speed2 ]; then   # the fastest eager-compiled paths, and a repeat of the best graphed one for spread
  run main           170 "${ONE_B[@]}" --real_data false --paths baseline,baseline+amp,ours,ours+varlen+graphs
  run compile        150 "${ONE_B[@]}" --real_data false --paths ours+varlen+compile
  run compile_graphs 150 "${ONE_B[@]}" --real_data false --paths ours+varlen+compile+graphs
elif [ "$STAGE" = speed3 ]; then
  run main           200 "${ONE_B[@]}" --real_data false --paths baseline,ours+varlen+graphs,ours+varlen+graphs+bf16act
  # (session 3 also ran `--ce_chunk 1046` here; ours now always computes training's loss, so that option is gone)
  run compile        150 "${ONE_B[@]}" --real_data false --paths ours+varlen+compile
elif [ "$STAGE" = speed4 ]; then  # compiled layers recomputed whole under checkpointing (checkpoint_kwargs)
  run main    260 "${ONE_B[@]}" --real_data false --paths baseline,baseline+amp,ours+varlen+graphs,ours+graphs+compile
  run compile 200 "${ONE_B[@]}" --real_data false --paths ours+varlen+compile,ours+varlen+compile+graphs
else  # the loss check trains SmolLM2 on emoji chats; its speed part runs the SmolLM2 shape (cheap to load)
  run loss    300 --shape smollm2-135m --seq_len 2048 --micro_batch 4 --rank 16 --doc_len 512 --steps 5 --warmup 2 \
    --paths ${LOSS_PATHS:-baseline,baseline+amp,ours+varlen+graphs,ours+varlen+graphs+bf16act} --loss_steps 50
fi

"$PY" - "$OUT" > "$OUT/summary.md" 2>>"$OUT/summary.log" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
runs = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}
main = runs.get("main", runs.get("loss", {})).get("paths", {})
print(f"device: {next(iter(runs.values()), {}).get('device', '?')}; versions: {next(iter(runs.values()), {}).get('versions')}\n")
print("| run | path | tokens/s | × baseline | × baseline+amp | peak GiB | MFU | held-out loss | Δ loss vs baseline+amp |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
for run, data in runs.items():
    for path, r in data["paths"].items():
        if "error" in r:
            print(f"| {run} | {path} | failed: {r['error'][:100]} ||||||")
            continue
        ratio = lambda b: f"{r['tokens_per_s'] / main[b]['tokens_per_s']:.2f}" if "tokens_per_s" in main.get(b, {}) else "–"
        loss, bl = r.get("held_out_loss"), main.get("baseline+amp", {}).get("held_out_loss")
        delta = f"{(loss - bl) / abs(bl):+.3%}" if loss is not None and bl else "–"
        peak = "–" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "–"
        print(f"| {run} | {path} | {r['tokens_per_s']:,.0f} | {ratio('baseline')} | {ratio('baseline+amp')} | {peak} | {mfu} | "
              f"{loss if loss is None else f'{loss:.4f}'} | {delta} |")
PY
cat "$OUT/summary.md"
echo "total $(( $(date +%s) - START ))s"
