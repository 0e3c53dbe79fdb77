#!/usr/bin/env bash
# Issue 18 (and 16's solo timing) on a host with two H200, after `source scripts/gpu_setup.sh`. Results under $OUT.
#   PART=emoji  the GPU-only tests; the replay answers cached; the default emoji config on 1 GPU alone, then on 2 GPUs
#               (--trainer.strategy ddp, the same global batch), each the whole command timed; both adapters evaluated
#               (strict emoji scoring + general suite), in parallel, one per GPU.
#   PART=scale  the 1B bench on 1 and 2 GPUs (training's default path); a 2-GPU run killed (SIGKILL) mid-epoch and
#               resumed on 1 GPU, its examples step by step against a 1-GPU run straight through (SKIP_BENCH=1: only that).
#   PART=x2a    the emoji config on 1 GPU (phase timer) and on 2 (Lightning's launcher, torchrun).
#   PART=x2b    the emoji config's time outside the steps, per rank (1 GPU, Lightning's launcher, torchrun).
#   PART=pair   the emoji config timed on 1 GPU and on 2 (Lightning's launcher), nothing else.
#   PART=style  the emoji config with --data.answer_style ${STYLE:-name_no_copy}, timed and evaluated (issue 16's eos).
#   PART=variants  the emoji config with each of VARIANTS ("name:ARGS|name:ARGS", e.g. "c42:--data.contrast_ratio 0.1"),
#               all fitted at once, spread round-robin over the host's GPUs, then all evaluated at once (strict
#               emoji + general); run-ons to $OUT. The config's replay answers are generated first (once per host).
#   PART=evals  after x2a: its 1- and 2-GPU adapters evaluated (strict emoji + general suite), the GPU tests beside.
#   PART=fsdp3b a Llama-3.2-3B-shaped model on 2 GPUs, DDP against FSDP (peak memory), the FSDP checkpoint resumed on 1.
set -u
OUT=${OUT:?set OUT}; mkdir -p "$OUT"; PY=python3; W=/tmp/multi; mkdir -p $W; START=$(date +%s)
log() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.txt"; }
fit() { "$PY" -m lit_llama_lab.cli fit --config configs/emoji.yaml "$@"; }
replay_cache() {  # the replay answers of configs/emoji.yaml's data section, generated once per host (only the prompts
  # missing from the cache; a fit would otherwise pay for them, and fits at once would each generate them): GPU $1, timeout $2
  CUDA_VISIBLE_DEVICES=$1 timeout "$2" "$PY" -c "
import yaml
from lit_llama_lab.data.datamodule import ChatDataModule
from lit_llama_lab.data.replay import ReplayArgs
config = yaml.safe_load(open('configs/emoji.yaml')); data = dict(config['data']); base = config['model']['name_or_path']
replay = ReplayArgs(**data.pop('replay'), model=base)
ChatDataModule(**data, tokenizer=base, replay=replay).prepare_data()" > $W/replay.log 2>&1
  log "replay cache rc=$?"
}
ev() { local t=$1; shift; timeout "$t" "$PY" -m lit_llama_lab.cli evaluate --batch_size 400 "$@"; }
evals() {  # one line per evaluation report under the folder $1 (default runs/eval)
  "$PY" - "${1:-runs/eval}" <<'PY'
import json, pathlib, sys
for p in sorted(pathlib.Path(sys.argv[1]).glob("*/metrics.json")):
    r = json.loads(p.read_text()); m = r["metrics"]
    if r.get("suite") == "general":
        print(f"{r['model']} general: {m['accuracy']:.1%} leakage {m['leakage']:.1%} eos {m['eos_rate']:.1%}")
    else:
        print(f"{r['model']} {r['split']}/{r['wordings']}: strict {m['name_accuracy']:.1%} lenient {m['name_accuracy_lenient']:.1%} eos {m['eos_rate']:.1%}")
PY
}
case ${PART:?set PART} in
emoji)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/summary.txt" 2>&1
  "$PY" -c "import torch, transformers, peft, bitsandbytes, lightning; print(torch.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__, lightning.__version__)" >> "$OUT/summary.txt" 2>&1
  NG=$(nvidia-smi -L | wc -l); G1=$(( NG > 1 ? 1 : 0 ))
  (CUDA_VISIBLE_DEVICES=0 timeout 200 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/gpu > $W/gpu-tests.log 2>&1; echo "pytest rc=$?" >> $W/gpu-tests.log) &
  replay_cache $G1 150
  wait; tail -n 3 $W/gpu-tests.log | tee -a "$OUT/summary.txt"
  t=$(date +%s); CUDA_VISIBLE_DEVICES=0 timeout 200 bash -c "$(declare -f fit); PY=$PY; fit --trainer.logger.init_args.name one" > $W/fit-one.log 2>&1
  log "1 GPU fit rc=$? wall $(( $(date +%s) - t )) s"; grep -E "Training plan|KL targets|it/s" $W/fit-one.log | tail -n 3 >> "$OUT/summary.txt"
  [ "$NG" -gt 1 ] && { t=$(date +%s); timeout 240 bash -c "$(declare -f fit); PY=$PY; fit --trainer.logger.init_args.name two --trainer.devices 2 --trainer.strategy ddp --data.global_batch_size 32" > $W/fit-two.log 2>&1
  log "2 GPU fit rc=$? wall $(( $(date +%s) - t )) s"; grep -E "Training plan|KL targets|it/s" $W/fit-two.log | tail -n 3 >> "$OUT/summary.txt"; }
  for r in one two; do ls runs/$r/checkpoints/ >> "$OUT/summary.txt" 2>&1; done
  (CUDA_VISIBLE_DEVICES=0 ev 200 --model runs/one/checkpoints/last --suite '[emoji,general]' --split '[train,test]' --wordings '[train,heldout]' --limit 800 > $W/ev-one.log 2>&1; echo "ev one rc=$?" >> $W/ev-one.log) &
  [ "$NG" -gt 1 ] && (CUDA_VISIBLE_DEVICES=1 ev 230 --model runs/two/checkpoints/last --suite '[emoji,general]' --split '[train,test]' --wordings '[train,heldout]' --limit 800 > $W/ev-two.log 2>&1; echo "ev two rc=$?" >> $W/ev-two.log) &
  wait; tail -n 1 $W/ev-one.log $W/ev-two.log >> "$OUT/summary.txt" 2>&1
  evals >> "$OUT/summary.txt"
  tar cf - -C runs/one/checkpoints last | split -b 15000000 -d - "$OUT/adapter-one.tar.part" ;;
scale)
  [ -n "${SKIP_BENCH:-}" ] || (timeout 420 "$PY" -m lit_llama_lab.cli bench --shape llama-3.2-1b --paths ours+varlen+compile+graphs --devices 2 \
     --output "$OUT/bench-2gpu.json" > $W/bench.log 2>&1; echo "bench rc=$?" >> $W/bench.log)
  [ -n "${SKIP_BENCH:-}" ] || tail -n 12 $W/bench.log >> "$OUT/summary.txt"
  # SIGKILL mid-epoch on 2 GPUs, resume on 1: the callbacks replaced by a step checkpoint and the example log
  kill_cfg() { cat > $W/kill-$1.yaml <<Y
trainer:
  max_steps: 80
  limit_val_batches: 0
  num_sanity_val_steps: 0
  callbacks:
    - class_path: lit_llama_lab.train.callbacks.AdapterCheckpoint
      init_args: {every_n_train_steps: 20, monitor: null, save_top_k: 1}
    - class_path: example_log.ExampleLog
      init_args: {path: $W/$1.jsonl}
Y
  }
  for n in first resumed straight; do kill_cfg $n; done
  export PYTHONPATH=$PYTHONPATH:$PWD/scripts
  setsid bash -c "$(declare -f fit); PY=$PY; fit --config $W/kill-first.yaml --trainer.logger.init_args.name kill --trainer.devices 2 --trainer.strategy ddp --data.global_batch_size 32" > $W/kill-first.log 2>&1 &
  pid=$!; t=$(date +%s)
  until grep -q '"global_step": 40' runs/kill/checkpoints/last/lit_llama_lab.json 2>/dev/null || [ $(( $(date +%s) - t )) -gt 150 ]; do sleep 0.5; done
  kill -9 -- -$pid; wait $pid 2>/dev/null; log "2-GPU run SIGKILLed after $(( $(date +%s) - t )) s; last: $(cat runs/kill/checkpoints/last/lit_llama_lab.json 2>/dev/null | tr -d '\n' | cut -c1-200)"
  CUDA_VISIBLE_DEVICES=0 timeout 150 bash -c "$(declare -f fit); PY=$PY; fit --config $W/kill-resumed.yaml --trainer.logger.init_args.name kill --data.global_batch_size 32 --ckpt_path last" > $W/kill-resumed.log 2>&1; log "resumed on 1 GPU rc=$?"
  CUDA_VISIBLE_DEVICES=0 timeout 150 bash -c "$(declare -f fit); PY=$PY; fit --config $W/kill-straight.yaml --trainer.logger.init_args.name straight --data.global_batch_size 32" > $W/kill-straight.log 2>&1; log "straight on 1 GPU rc=$?"
  "$PY" scripts/example_log.py compare $W/straight.jsonl $W/first.jsonl $W/resumed.jsonl 2>&1 | tee -a "$OUT/summary.txt" ;;
x2a)
  # the emoji config on 1 GPU (the phase timer of scripts/emoji_experiment.py), on 2 GPUs through Lightning's launcher
  # (rank 1 starts when rank 0 reaches fit) and through torchrun (both ranks start together); the last one evaluated
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/summary.txt" 2>&1
  replay_cache 0 150
  t=$(date +%s); CUDA_VISIBLE_DEVICES=0 EVAL_LIMIT=0 timeout 200 "$PY" scripts/emoji_experiment.py "$OUT/fit-one.json" fit --config configs/emoji.yaml --trainer.logger.init_args.name one > $W/fit-one.log 2>&1
  log "1 GPU fit (emoji_experiment.py) rc=$? wall $(( $(date +%s) - t )) s"
  grep -E '"(train_seconds|data_setup_seconds|steps|validation|first_batches|train_batches|sanity_check|model_load|sample_tables|checkpoint_writes|before_first_batch|after_train_end)"' "$OUT/fit-one.json" | tr -d '\n' >> "$OUT/summary.txt"; echo >> "$OUT/summary.txt"
  two="--trainer.devices 2 --trainer.strategy ddp --data.global_batch_size 32"
  t=$(date +%s); timeout 200 bash -c "$(declare -f fit); PY=$PY; fit --trainer.logger.init_args.name two $two" > $W/fit-two.log 2>&1
  log "2 GPU fit (Lightning's launcher) rc=$? wall $(( $(date +%s) - t )) s"; grep -E "it/s" $W/fit-two.log | tail -n 2 >> "$OUT/summary.txt"
  t=$(date +%s); timeout 200 torchrun --standalone --nproc-per-node 2 -m lit_llama_lab.cli fit --config configs/emoji.yaml --trainer.logger.init_args.name tr $two > $W/fit-tr.log 2>&1
  log "2 GPU fit (torchrun) rc=$? wall $(( $(date +%s) - t )) s"; grep -E "it/s" $W/fit-tr.log | tail -n 1 >> "$OUT/summary.txt"
  ;;
x2b)
  # where the 2-GPU emoji fit spends the time outside its steps: scripts/emoji_experiment.py's marks on every rank
  # (seconds from the launch to the end of imports, the CLI built, the data set up, fit started, the first and the
  # last batch, fit returned) on 1 GPU, under Lightning's launcher and under torchrun. RUNS picks them (default "one
  # two tr"; "early" runs the early-launch branch's package, copied untracked to EARLY=folder, e.g. .early). The
  # replay cache must exist (PART=pair or x2a first on this host, or REPLAY=1). PROFILE_TWO=A:B profiles batches A..B
  # of the Lightning-launcher run on every rank (emoji_experiment.py's PROFILE_STEPS: GPU busy share, host waits).
  two="--trainer.devices 2 --trainer.strategy ddp --data.global_batch_size 32"
  [ -n "${REPLAY:-}" ] && { replay_cache 0 200; }
  exp() { local name=$1; shift; local t=$(date +%s); LAUNCH_T0=$(date +%s.%N) EVAL_LIMIT=0 timeout 220 "$@" > $W/x2b-$name.log 2>&1
    log "$name rc=$? wall $(( $(date +%s) - t )) s"; }
  for r in ${RUNS:-one two tr}; do case $r in
    one) CUDA_VISIBLE_DEVICES=0 exp one "$PY" scripts/emoji_experiment.py "$OUT/x2b-one.json" fit --config configs/emoji.yaml --trainer.logger.init_args.name x2b-one ;;
    two) PROFILE_STEPS=${PROFILE_TWO:-} exp two "$PY" scripts/emoji_experiment.py "$OUT/x2b-two.json" fit --config configs/emoji.yaml --trainer.logger.init_args.name x2b-two $two ;;
    tr) exp tr torchrun --standalone --nproc-per-node 2 scripts/emoji_experiment.py "$OUT/x2b-tr.json" fit --config configs/emoji.yaml --trainer.logger.init_args.name x2b-tr $two ;;
    early) PYTHONPATH=$PWD/${EARLY:?}:$PYTHONPATH exp early "$PY" scripts/emoji_experiment.py "$OUT/x2b-early.json" fit --config configs/emoji.yaml --trainer.logger.init_args.name x2b-early $two ;;
  esac; done
  for f in "$OUT"/x2b-*.json*; do "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1].split('/')[-1], d['marks'], {k: round(v, 1) for k, v in d['phases'].items()}, d.get('profile'))" "$f"; done >> "$OUT/summary.txt"
  ;;
pair)
  # the emoji config timed on 1 GPU, then on 2 (Lightning's launcher, the same global batch); the replay cache back too
  replay_cache 0 200; find /root/llcache -path '*replay*' -name '*.jsonl' -exec cp {} "$OUT/" \;
  t=$(date +%s); CUDA_VISIBLE_DEVICES=0 timeout 200 bash -c "$(declare -f fit); PY=$PY; fit --trainer.logger.init_args.name one" > $W/fit-one.log 2>&1
  log "1 GPU fit rc=$? wall $(( $(date +%s) - t )) s"; grep -E "it/s" $W/fit-one.log | tail -n 1 >> "$OUT/summary.txt"
  t=$(date +%s); timeout 200 bash -c "$(declare -f fit); PY=$PY; fit --trainer.logger.init_args.name two --trainer.devices 2 --trainer.strategy ddp --data.global_batch_size 32" > $W/fit-two.log 2>&1
  log "2 GPU fit rc=$? wall $(( $(date +%s) - t )) s"; grep -E "it/s" $W/fit-two.log | tail -n 1 >> "$OUT/summary.txt"
  ;;
style)
  # issue 16's eos: the default emoji config with --data.answer_style ${STYLE:-name_no_copy} (the answer does not
  # start by copying the emoji), timed, then evaluated as PART=emoji does; every answer without eos copied to $OUT
  st=${STYLE:-name_no_copy}; t=$(date +%s)
  CUDA_VISIBLE_DEVICES=0 timeout 200 bash -c "$(declare -f fit); PY=$PY; fit --trainer.logger.init_args.name $st --data.answer_style $st" > $W/fit-$st.log 2>&1
  log "$st fit rc=$? wall $(( $(date +%s) - t )) s"; grep -E "Training plan|KL targets|it/s" $W/fit-$st.log | tail -n 3 >> "$OUT/summary.txt"
  CUDA_VISIBLE_DEVICES=0 ev 230 --model runs/$st/checkpoints/last --answer_style $st --suite '[emoji,general]' --split '[train,test]' --wordings '[train,heldout]' --limit 800 > $W/ev-$st.log 2>&1
  log "eval rc=$?"; evals >> "$OUT/summary.txt" 2>&1
  cat runs/eval/*/answers.jsonl | grep '"stopped": false' > "$OUT/runons.jsonl"; wc -l < "$OUT/runons.jsonl" >> "$OUT/summary.txt"
  for f in runs/eval/*/report.md; do echo "== $f"; head -c 2500 "$f"; done > "$OUT/reports.md" 2>&1
  ;;
variants)
  IFS='|' read -ra VS <<< "${VARIANTS:?set VARIANTS}"; NG=$(nvidia-smi -L | wc -l); i=0
  replay_cache 0 200
  for v in "${VS[@]}"; do n=${v%%:*}; a=${v#*:}; g=$(( i++ % NG ))
    (t=$(date +%s); CUDA_VISIBLE_DEVICES=$g timeout ${FIT_TIMEOUT:-300} bash -c "$(declare -f fit); PY=$PY; fit --trainer.logger.init_args.name $n $a" > $W/fit-$n.log 2>&1
     log "$n fit rc=$? wall $(( $(date +%s) - t )) s ($a)") &
  done; wait
  i=0; for v in "${VS[@]}"; do n=${v%%:*}; g=$(( i++ % NG )); grep -E "contrast:|replay:" $W/fit-$n.log | tail -n 2 >> "$OUT/summary.txt"
    (CUDA_VISIBLE_DEVICES=$g ev ${EV_TIMEOUT:-180} --model runs/$n/checkpoints/last --output_dir runs/eval-$n --suite '[emoji,general]' --split '[train,test]' --wordings '[train,heldout]' --limit 800 > $W/ev-$n.log 2>&1; log "eval $n rc=$?") &
  done; wait
  for v in "${VS[@]}"; do n=${v%%:*}; echo "== $n"; evals runs/eval-$n
    cat runs/eval-$n/*/answers.jsonl | grep '"stopped": false' | sed "s/^/$n /" >> "$OUT/runons.jsonl"; done >> "$OUT/summary.txt" 2>&1
  ;;
evals)
  # after x2a on the same host: the 1-GPU and the 2-GPU (CLI) adapters evaluated one after the other on GPU 0, the
  # GPU-only tests on GPU 1 meanwhile; every answer that ran on without eos copied to $OUT
  (CUDA_VISIBLE_DEVICES=1 timeout 280 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/gpu > $W/gpu-tests.log 2>&1; echo "pytest rc=$?" >> $W/gpu-tests.log) &
  for r in one two; do CUDA_VISIBLE_DEVICES=0 ev 150 --model runs/$r/checkpoints/last --output_dir runs/eval-$r --suite '[emoji,general]' --split '[train,test]' --wordings '[train,heldout]' --limit 800 > $W/ev-$r.log 2>&1; log "eval $r rc=$?"; done
  wait; tail -n 3 $W/gpu-tests.log | tee -a "$OUT/summary.txt"
  for r in one two; do echo "== $r"; evals runs/eval-$r; done >> "$OUT/summary.txt" 2>&1
  cat runs/eval-*/*/answers.jsonl | grep '"stopped": false' > "$OUT/runons.jsonl"; wc -l < "$OUT/runons.jsonl" >> "$OUT/summary.txt"
  ;;
fsdp3b)
  # a Llama-3.2-3B-shaped model (random weights), QLoRA on 2 GPUs: DDP against FSDP at the same per-GPU batch, then the
  # FSDP checkpoint resumed on 1 GPU; every step's loss and each rank's peak memory in $W/<run>.jsonl
  export PYTHONPATH=$PYTHONPATH:$PWD/scripts
  M=$("$PY" -c "from lit_llama_lab.tools.bench_paths import shape_model; print(shape_model('llama-3.2-3b'))" 2>$W/shape.log); log "3B model: $M"
  cfg() { cat > $W/$1.yaml <<Y
trainer:
  max_steps: $2
  callbacks:
    - class_path: lit_llama_lab.train.callbacks.AdapterCheckpoint
      init_args: {every_n_train_steps: 20, monitor: null, save_top_k: 1}
    - class_path: example_log.StepLog
      init_args: {path: $W/$1.jsonl}
model: {name_or_path: $M, distill_weight: 0.0}
data: {batch_size: 8, replay: {ratio: 0.0}}
Y
  }
  cfg ddp3b 20; cfg fsdp3b 20; cfg resume3b 30
  common="--trainer.limit_val_batches 0 --trainer.num_sanity_val_steps 0"
  t=$(date +%s); timeout 130 bash -c "$(declare -f fit); PY=$PY; fit --config $W/ddp3b.yaml --trainer.logger.init_args.name ddp3b --trainer.devices 2 --trainer.strategy ddp $common" > $W/ddp3b.log 2>&1; log "3B DDP rc=$? $(( $(date +%s) - t )) s"
  t=$(date +%s); timeout 150 bash -c "$(declare -f fit); PY=$PY; fit --config $W/fsdp3b.yaml --trainer.logger.init_args.name fsdp3b --trainer.devices 2 --trainer.strategy fsdp $common" > $W/fsdp3b.log 2>&1; log "3B FSDP rc=$? $(( $(date +%s) - t )) s"
  t=$(date +%s); CUDA_VISIBLE_DEVICES=0 timeout 100 bash -c "$(declare -f fit); PY=$PY; fit --config $W/resume3b.yaml --trainer.logger.init_args.name fsdp3b --ckpt_path last $common" > $W/resume3b.log 2>&1; log "3B resumed on 1 GPU rc=$? $(( $(date +%s) - t )) s"
  for r in ddp3b fsdp3b resume3b; do echo "== $r"; grep peak_gib $W/$r.jsonl; grep '"rank": 0' $W/$r.jsonl | grep loss | sed -n '1p;$p'; tail -n 2 $W/$r.log; done >> "$OUT/summary.txt" 2>&1 ;;
esac
tar czf "$OUT/logs.tgz" -C $W . ; log "done"; ls -la "$OUT"
