#!/usr/bin/env bash
# On the GPU host, after `source scripts/gpu_setup.sh` has put the embedded model in place: the GPU tests, the
# emoji config end to end (timed), then the trained adapter, its merged exports and GGUF files evaluated on the
# emoji splits (issues 7 and 8). Results under $OUT (at most 8 files come back).
set -u
OUT=${OUT:?set OUT}; PY=python3; mkdir -p "$OUT"; START=$(date +%s)
log() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.log"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/summary.log" 2>&1
"$PY" -c "import torch, transformers, peft, bitsandbytes, lightning; print(torch.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__, lightning.__version__)" >> "$OUT/summary.log" 2>&1
log "convert"; "$PY" -c "from lit_llama_lab.model.load import load_tokenizer; load_tokenizer('smollm2-135m'); load_tokenizer('tiny-random')" > "$OUT/run.log" 2>&1
log "gpu tests"; timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/gpu/test_graphs.py >> "$OUT/run.log" 2>&1; log "pytest rc=$?"
log "fit"; rm -rf runs/emoji
EVAL_LIMIT=1 timeout ${FIT_LIMIT:-330} "$PY" scripts/emoji_experiment.py "$OUT/fit.json" fit --config configs/emoji.yaml ${FIT_ARGS:-} > "$OUT/fit.log" 2>&1
log "fit rc=$?"; grep -E '"(train_seconds|steps|epochs|tokens_per_s|peak_gib|val_loss|train_batches|validation|first_batches|batch_shapes|sanity_check|model_load|sample_tables|checkpoint_writes|before_first_batch|after_train_end)"' "$OUT/fit.json" | tee -a "$OUT/summary.log"
ckpt=runs/emoji/checkpoints/last; ls $ckpt >> "$OUT/summary.log" 2>&1
cp runs/emoji/version_0/events.out.tfevents.* "$OUT/events.tfevents" 2>/dev/null
ev() { local t=$1; shift; timeout "$t" "$PY" -m lit_llama_lab.cli evaluate --batch_size 400 "$@" >> "$OUT/run.log" 2>&1; log "evaluate rc=$? $*"; }
ev 150 --model "$ckpt" --split '[train,test]' --wordings '[train,heldout]' --limit 800
if [ -z "${ONLY_FIT:-}" ]; then  # ONLY_FIT=1: train and evaluate the adapter only
log "export"; timeout 90 "$PY" -m lit_llama_lab.cli export --checkpoint $ckpt --output exports/emoji --gguf f16,q8_0 >> "$OUT/run.log" 2>&1; log "export rc=$?"
ls -la exports/emoji exports/emoji/gguf >> "$OUT/summary.log" 2>&1
ev 60 --model exports/emoji --split test --quantize none
for g in exports/emoji/gguf/*.gguf; do ev 60 --model "$g" --split test --quantize none; done
timeout 60 "$PY" -m lit_llama_lab.cli export --checkpoint $ckpt --output exports/emoji-original --merge_into original --gguf none >> "$OUT/run.log" 2>&1
ev 60 --model exports/emoji-original --split test --quantize none
fi
"$PY" - > "$OUT/evals.md" <<'PY'
import json, pathlib
print("| model | split | wordings | name acc | eos | mean tokens | perplexity | seconds |\n|---|---|---|---:|---:|---:|---:|---:|")
for p in sorted(pathlib.Path("runs/eval").glob("*/metrics.json")):
    r = json.loads(p.read_text()); m = r["metrics"]
    print(f"| {r['model']} | {r['split']} | {r['wordings']} | {m.get('name_accuracy', float('nan')):.1%} | {m.get('eos_rate', float('nan')):.1%} | "
          f"{m.get('mean_answer_tokens', float('nan')):.1f} | {m.get('perplexity', float('nan')):.3f} | {r['settings']['seconds']} |")
PY
cat "$OUT/evals.md"; tar czf "$OUT/eval_reports.tgz" runs/eval 2>/dev/null
log "done"
