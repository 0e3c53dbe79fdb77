#!/usr/bin/env bash
# One GPU call of the re-measure round (issues 16 and 17) on a 2-GPU host, after `source scripts/gpu_setup.sh`:
# two streams in parallel, one per GPU, each writing under $OUT/<stream>.
#   ROUND=a  GPU0: the 1B bench (= make bench).  GPU1: the base, the default emoji config, KL 2 for 12 epochs.
#   ROUND=b  GPU0: the GPU-only tests, then the name_fact answer style.  GPU1: the two-step path (a chat adapter
#            on the bundled FineTome sample, then the default emoji config started from it).
#   ROUND=c  GPU0: KL 3 for 12 epochs.  GPU1: KL 4 for 16 epochs.
set -u
OUT=${OUT:?set OUT}; mkdir -p "$OUT"; PY=python3
R=scripts/gpu_retention.sh
case ${ROUND:?set ROUND} in
a)
  (CUDA_VISIBLE_DEVICES=0 timeout 560 $PY -m lit_llama_lab.cli bench --shape llama-3.2-1b --output "$OUT/bench-1b.json" \
     > "$OUT/bench-1b.log" 2>&1; echo "bench rc=$?" >> "$OUT/bench-1b.log") &
  (CUDA_VISIBLE_DEVICES=1 OUT=$OUT/ret W=/tmp/retA FIT_LIMIT=300 \
     VARIANTS='default|;kl2e12|--model.distill_weight 2 --trainer.max_epochs 12' bash $R > "$OUT/ret.log" 2>&1) &
  wait ;;
b)
  (CUDA_VISIBLE_DEVICES=0 timeout 240 $PY -m pytest -q -p no:cacheprovider -m gpu tests/gpu > "$OUT/gpu-tests.log" 2>&1
   echo "pytest rc=$?" >> "$OUT/gpu-tests.log"
   CUDA_VISIBLE_DEVICES=0 OUT=$OUT/style W=/tmp/retB SKIP_BASE=1 FIT_LIMIT=250 \
     VARIANTS='namefact|--data.answer_style name_fact' bash $R > "$OUT/style.log" 2>&1) &
  (export CUDA_VISIBLE_DEVICES=1; L=$OUT/twostep.log; t0=$(date +%s)
   timeout 150 $PY -m lit_llama_lab.cli fit --config configs/finetome.yaml --data.source lit_llama_lab/data/samples/finetome_sample.jsonl \
     --model.lora.r 32 --model.lora.alpha 32 --model.lora.use_rslora true --trainer.max_epochs 10 --trainer.val_check_interval 1.0 --model.learning_rate 2e-4 --data.val_fraction 0.1 --data.test_fraction 0 \
     --trainer.logger.init_args.name chat > "$OUT/chat-fit.log" 2>&1
   echo "[$(( $(date +%s) - t0 ))s] chat fit rc=$?" >> $L
   timeout 120 $PY -m lit_llama_lab.cli evaluate --model '[smollm2-135m,runs/chat/checkpoints/last]' --suite general \
     --batch_size 400 >> $L 2>&1; echo "[$(( $(date +%s) - t0 ))s] chat eval rc=$?" >> $L
   OUT=$OUT/twostep W=/tmp/retC SKIP_BASE=1 FIT_LIMIT=250 \
     VARIANTS='afterchat|--model.init_adapter runs/chat/checkpoints/last' bash $R >> $L 2>&1) &
  wait ;;
c)
  (CUDA_VISIBLE_DEVICES=0 OUT=$OUT/kl3 W=/tmp/retD SKIP_BASE=1 FIT_LIMIT=300 \
     VARIANTS='kl3e12|--model.distill_weight 3 --trainer.max_epochs 12' bash $R > "$OUT/kl3.log" 2>&1) &
  (CUDA_VISIBLE_DEVICES=1 OUT=$OUT/kl4 W=/tmp/retE SKIP_BASE=1 FIT_LIMIT=300 \
     VARIANTS='kl4e16|--model.distill_weight 4 --trainer.max_epochs 16' bash $R > "$OUT/kl4.log" 2>&1) &
  wait ;;
esac
# What comes back is limited to 8 files: the summaries in one text file, everything else in one archive.
W=$(mktemp -d); mv "$OUT"/* "$W"/
{ for f in $(cd "$W" && find . -name summary.log -o -name evals.md -o -name 'gpu-tests.log' -o -name twostep.log | sort); do
    echo "=== $f"; tail -n 60 "$W/$f"; done
  [ -f "$W/bench-1b.log" ] && { echo "=== bench-1b.log"; tail -n 40 "$W/bench-1b.log"; }; } > "$OUT/summary.txt"
[ -f "$W/bench-1b.json" ] && cp "$W/bench-1b.json" "$OUT/"
tar czf "$OUT/logs.tgz" -C "$W" . ; ls -la "$OUT"
