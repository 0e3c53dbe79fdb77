#!/usr/bin/env bash
# Issue 20 on one GPU, after `source scripts/gpu_setup.sh`: the bench's peers beside ours. Results under $OUT.
# Wheels first, on the CPU machine: `SLIM=1 bash scripts/peer_wheelhouse.sh` (.whl3 Unsloth 29.8 MiB, .whl4 TRL +
# Liger 2.1 MiB). Carry .whl4 with the first setup call (.whl + .model1 + .whl4 < 64 MiB) and .whl3 in a call of its
# own; this script copies what arrived to /root/gpu and installs:
#   .whl4 into /tmp/site (beside our stack: transformers 5.24, datasets 5.2);
#   .whl3 into /tmp/unsloth-site with .whl's wheels except datasets and transformers, so Unsloth gets the host's
#   transformers 5.17 and its own datasets 4.8.5; the unsloth bench runs with PYTHONPATH=/tmp/unsloth-site:$PWD:/root/smol/site-packages only.
# STAGE=1: the synthetic bench (baseline, ours, trl, trl+liger; GPU 0) with the peer GPU tests beside it (TEST_GPU=1 on a
# two-GPU host, else after it); STAGE=2: Unsloth's bench path (and, STAGE=2 alone, its GPU test), then the FineTome
# projection (FINETOME_PATHS, default baseline+amp, ours and trl+liger; Unsloth in its own process; UNSLOTH=0 skips
# Unsloth). Default: both. Timeouts: BENCH_TIMEOUT, UNSLOTH_TIMEOUT, UNSLOTH_TEST_TIMEOUT, FINETOME_TIMEOUT, UNSLOTH_FT_TIMEOUT. PEER_PATHS: stage 1's paths; BENCH_ARGS: more bench options
# for the synthetic benches (e.g. --loss_steps 0 to time speed only).
set -u
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 UNSLOTH_COMPILE_LOCATION=/tmp/unsloth_cc
OUT=${OUT:?set OUT}; mkdir -p "$OUT"; PY=python3; START=$(date +%s)
log() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.txt"; }
source scripts/gpu_peer_sites.sh  # .whl3/.whl4 installed; US: Unsloth's PYTHONPATH
unsloth_test() {  # Unsloth's GPU test (unsloth imported before anything imports transformers), timeout $1 s
  PYTHONPATH=$US timeout "$1" "$PY" -c "import unsloth, sys, pytest; sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/gpu/test_peers.py', '-k', 'unsloth']))" \
    > "$OUT/unsloth-test.log" 2>&1
}
FT_PATHS=${FINETOME_PATHS-baseline+amp,ours+varlen+compile+graphs,trl+liger}  # set and empty: no FineTome bench
log "installed"
case ${STAGE:-all} in all|1)
# the synthetic 1B bench on GPU 0 (each path its own process); the TRL/Liger GPU tests on GPU 1 meanwhile, then Unsloth's
(CUDA_VISIBLE_DEVICES=${TEST_GPU:-0} timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/gpu/test_peers.py > "$OUT/peer-tests.log" 2>&1
 echo "peer tests rc=$? $(tail -n 1 "$OUT/peer-tests.log")" >> "$OUT/tests.txt"
 CUDA_VISIBLE_DEVICES=${TEST_GPU:-0} unsloth_test 240; echo "unsloth test rc=$? $(tail -n 1 "$OUT/unsloth-test.log")" >> "$OUT/tests.txt") &
[ "${TEST_GPU:-0}" = 0 ] && wait
CUDA_VISIBLE_DEVICES=0 timeout ${BENCH_TIMEOUT:-480} "$PY" -m lit_llama_lab.cli bench --shape llama-3.2-1b --paths ${PEER_PATHS:-baseline,ours+varlen+compile+graphs,trl,trl+liger} ${BENCH_ARGS:-} \
  --output "$OUT/bench-peers.json" > "$OUT/bench-peers.log" 2>&1; log "bench rc=$?"; tail -n 7 "$OUT/bench-peers.log" >> "$OUT/summary.txt"
[ "${STAGE:-all}" = all ] || { wait; cat "$OUT/tests.txt" >> "$OUT/summary.txt"; } ;;
esac
case ${STAGE:-all} in all|2)
# Unsloth's bench path isolated (the child imports unsloth first) and its GPU test (UNSLOTH=0 skips both); then the
# FineTome projection: FINETOME_PATHS in one process (empty: none), Unsloth in its own
if [ "${UNSLOTH:-1}" != 0 ]; then
CUDA_VISIBLE_DEVICES=0 PYTHONPATH=$US timeout ${UNSLOTH_TIMEOUT:-240} "$PY" -c "import unsloth; from lit_llama_lab.cli import main; main()" bench --shape llama-3.2-1b \
  --paths unsloth ${BENCH_ARGS:-} --isolate true --output "$OUT/bench-unsloth.json" > "$OUT/bench-unsloth.log" 2>&1; log "unsloth bench rc=$?"
tail -n 4 "$OUT/bench-unsloth.log" >> "$OUT/summary.txt"
[ "${STAGE:-all}" = 2 ] && { CUDA_VISIBLE_DEVICES=0 unsloth_test ${UNSLOTH_TEST_TIMEOUT:-200}; log "unsloth test rc=$? $(tail -n 1 "$OUT/unsloth-test.log")"; }
fi
[ -n "$FT_PATHS" ] && {
CUDA_VISIBLE_DEVICES=0 timeout ${FINETOME_TIMEOUT:-420} "$PY" -m lit_llama_lab.cli bench --shape llama-3.2-1b --workload finetome \
  --paths $FT_PATHS --steps 200 --warmup 20 --output "$OUT/finetome.json" > "$OUT/finetome.log" 2>&1
log "finetome rc=$?"; tail -n 6 "$OUT/finetome.log" >> "$OUT/summary.txt"; }
[ "${UNSLOTH:-1}" != 0 ] && {
CUDA_VISIBLE_DEVICES=0 PYTHONPATH=$US timeout ${UNSLOTH_FT_TIMEOUT:-150} "$PY" -c "import unsloth; from lit_llama_lab.cli import main; main()" bench --shape llama-3.2-1b \
  --workload finetome --paths unsloth --steps 200 --warmup 20 --output "$OUT/finetome-unsloth.json" > "$OUT/finetome-unsloth.log" 2>&1
log "finetome unsloth rc=$?"; tail -n 3 "$OUT/finetome-unsloth.log" >> "$OUT/summary.txt"; } ;;
esac
wait; [ "${STAGE:-all}" = all ] && cat "$OUT/tests.txt" >> "$OUT/summary.txt"
log "done"
