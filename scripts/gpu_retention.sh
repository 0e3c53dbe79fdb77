#!/usr/bin/env bash
# On the GPU host, after `source scripts/gpu_setup.sh`: the retention experiment of issue 16. The base model on the
# general suite, then the emoji config trained with each VARIANTS entry ("name|overrides") and evaluated on the
# emoji splits (strict scoring) and the general suite. The adapter of KEEP comes back in 15 MB parts under $OUT.
set -u
OUT=${OUT:?set OUT}; PY=python3; W=${W:-/tmp/retention}; mkdir -p "$OUT" $W; START=$(date +%s)
log() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.log"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/summary.log" 2>&1
"$PY" -c "import torch, transformers, peft, bitsandbytes, lightning; print(torch.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__, lightning.__version__)" >> "$OUT/summary.log" 2>&1
ev() { local t=$1; shift; timeout "$t" "$PY" -m lit_llama_lab.cli evaluate --batch_size 400 "$@" >> "$W/run.log" 2>&1; log "evaluate rc=$? $*"; }
log "convert"; "$PY" -c "from lit_llama_lab.model.load import load_tokenizer; load_tokenizer('smollm2-135m')" >> "$W/run.log" 2>&1
[ -n "${SKIP_BASE:-}" ] || ev 120 --model smollm2-135m --suite '[emoji,general]' --split test --limit 200
IFS=';' read -ra variants <<< "${VARIANTS:-r0|--data.replay.ratio 0}"
for v in "${variants[@]}"; do
  name=${v%%|*}; args=${v#*|}
  log "fit $name: $args"
  EVAL_LIMIT=0 timeout ${FIT_LIMIT:-200} "$PY" scripts/emoji_experiment.py "$W/fit-$name.json" fit --config configs/emoji.yaml \
    --trainer.logger.init_args.name "emoji-$name" $args > "$W/fit-$name.log" 2>&1
  log "fit rc=$?"; grep -E '"(train_seconds|data_setup_seconds|steps|peak_gib|val_loss)"' "$W/fit-$name.json" | tr -d '\n' | tee -a "$OUT/summary.log"; echo | tee -a "$OUT/summary.log"
  ev 200 --model "runs/emoji-$name/checkpoints/last" --suite '[emoji,general]' --split '[train,test]' --wordings '[train,heldout]' --limit 800 ${EVAL_ARGS:-}
done
"$PY" - > "$OUT/evals.md" <<'PY'
import json, pathlib
rows = [json.loads(p.read_text()) for p in sorted(pathlib.Path("runs/eval").glob("*/metrics.json"))]
print("| model | split | wordings | strict | lenient | eos | tokens |\n|---|---|---|---:|---:|---:|---:|")
for r in rows:
    m = r["metrics"]
    if r.get("suite") != "general":
        print(f"| {r['model']} | {r['split']} | {r['wordings']} | {m['name_accuracy']:.1%} | {m['name_accuracy_lenient']:.1%} | {m['eos_rate']:.1%} | {m['mean_answer_tokens']:.1f} |")
print("\n| model | general accuracy | leakage | eos | tokens | per category |\n|---|---:|---:|---:|---:|---|")
for r in rows:
    m = r["metrics"]
    if r.get("suite") == "general":
        cats = " ".join(f"{k.split('/')[1]}={v:.0%}" for k, v in m.items() if k.startswith("accuracy/"))
        print(f"| {r['model']} | {m['accuracy']:.1%} | {m['leakage']:.1%} | {m['eos_rate']:.1%} | {m['mean_answer_tokens']:.1f} | {cats} |")
PY
cat "$OUT/evals.md"
cp -r runs/eval $W/; for d in runs/emoji-*/version_*; do mkdir -p $W/$d && cp $d/events.* $d/hparams.yaml $W/$d/; done
tar czf "$OUT/results.tgz" -C $W . 2>/dev/null
# KEEP=auto: the variant that meets most of issue 16's targets (general accuracy breaks ties)
[ "${KEEP:-}" = auto ] && KEEP=$("$PY" - <<'PY'
import json, pathlib
res = [json.loads(p.read_text()) for p in pathlib.Path("runs/eval").glob("*/metrics.json")]
base = next((r["metrics"]["accuracy"] for r in res if r["model"] == "smollm2-135m" and r.get("suite") == "general"), 0)
best = {}
for r in res:
    if not r["model"].startswith("runs/emoji-"):
        continue
    name, m = r["model"].split("/")[1].removeprefix("emoji-"), r["metrics"]
    s = best.setdefault(name, [0, 0.0])
    if r.get("suite") == "general":
        s[0] += (m["accuracy"] >= 0.95 * base) + (m["leakage"] == 0); s[1] = m["accuracy"]
    else:
        need = 0.60 if r["split"] == "test" else 0.97
        s[0] += (m["name_accuracy"] >= need) + (m["eos_rate"] >= 0.999)
print(max(best, key=lambda k: tuple(best[k])) if best else "")
PY
)
log "keep: ${KEEP:-none}"
if [ -n "${KEEP:-}" ] && [ -d "runs/emoji-$KEEP/checkpoints/last" ]; then
  tar cf - -C "runs/emoji-$KEEP/checkpoints" last | split -b 15000000 -d - "$OUT/adapter-$KEEP.tar.part"
fi
log "done"
