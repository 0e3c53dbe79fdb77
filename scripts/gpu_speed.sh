#!/usr/bin/env bash
# Issue 20's 1B step on one GPU, after `source scripts/gpu_setup.sh`. Carry .whl3 (Unsloth) and .whl4 (TRL + Liger)
# with the STAGE=peers or STAGE=unsloth call itself: gpu_peer_sites.sh installs what that call brought (a run
# that carried .whl4 only with gpu_setup.sh's call had no TRL).
# Results under $OUT.
#   STAGE=peers  ONE invocation: training's default 1B path, Unsloth (from its own site, --unsloth_pythonpath), the
#                previous default (fp32 activations) and TRL + Liger, speed only (PATHS overrides).
#   STAGE=loss   the held-out loss check: the plain stack against training's 1B path (50 steps on emoji chats, each
#                path in its own process), then where that path's time goes (scripts/bench_census.py, graphs off).
#   STAGE=quality  ONE invocation with the held-out loss check for every path: the plain stack, training's 1B path,
#                Unsloth and TRL + Liger (each learns the same 50 steps of emoji chats on SmolLM2, then the held-out
#                loss), speed on 3 + 10 steps only.
#   STAGE=tests  the GPU-only tests (tests/gpu), then the FineTome projection of training's 1B path.
#   STAGE=install  only the peers' sites (carry .whl3 and .whl4 with this call): about 60 s, which would otherwise
#                count against a STAGE=quality call's 600 s (the 8th session's R lost TRL + Liger to it). Later calls
#                reuse the sites and the versions read then, without carrying the wheels again (the 9th session's
#                quality call still spent 53 s re-reading the versions: importing unsloth is slow).
#   STAGE=unsloth  Unsloth alone, twice: as the previous session ran it (a parent process that imports unsloth, the
#                path isolated in a child) and as STAGE=peers does; and the host's pinned copy bandwidth, which
#                Unsloth's offloaded checkpoints use every step. Then STAGE=peers (PATHS defaults to ours, unsloth,
#                trl+liger). BENCH_ARGS: more bench options for STAGE=peers/unsloth (e.g. --warmup 10 --steps 60).
set -u
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 UNSLOTH_COMPILE_LOCATION=/tmp/unsloth_cc
OUT=${OUT:?set OUT}; mkdir -p "$OUT"; PY=python3; START=$(date +%s)
log() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.txt"; }
OURS=ours+varlen+compile+graphs  # = what training runs for a 1B model on a GPU (every auto: bf16 activations and adapter
                                 # matmuls, the MLP in 6 row blocks, checkpoints in host memory)
case ${STAGE:?STAGE=peers, quality, loss, tests, install or unsloth} in
unsloth|peers|quality|install)
  source scripts/gpu_peer_sites.sh; log "installed" ;;&
unsloth)
  "$PY" - >> "$OUT/summary.txt" 2>&1 <<'PY'
import time, torch
host, dev = torch.empty(2**29, dtype=torch.uint8, pin_memory=True), torch.empty(2**29, dtype=torch.uint8, device="cuda")
for name, dst, src in (("host->GPU", dev, host), ("GPU->host", host, dev)):
    dst.copy_(src); torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(10):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(); print(f"pinned {name}: {10 * 2**29 / (time.perf_counter() - t) / 1e9:.1f} GB/s")
PY
  PYTHONPATH=$US timeout 240 "$PY" -c "import unsloth; from lit_llama_lab.cli import main; main()" bench --shape llama-3.2-1b \
    --paths unsloth --loss_steps 0 --isolate true --output "$OUT/bench-unsloth-old.json" > "$OUT/bench-unsloth-old.log" 2>&1
  log "unsloth the old way rc=$?"; tail -n 1 "$OUT/bench-unsloth-old.log" | cut -c1-200 >> "$OUT/summary.txt"
  PATHS=${PATHS:-$OURS,unsloth,trl+liger} ;;&
unsloth|peers)
  timeout ${TIMEOUT:-540} "$PY" -m lit_llama_lab.cli bench --shape llama-3.2-1b --loss_steps 0 --unsloth_pythonpath "$US" ${BENCH_ARGS:-} \
    --paths ${PATHS:-$OURS,unsloth,ours+varlen+compile+graphs+fp32act,trl+liger} --output "$OUT/bench-peers.json" \
    > "$OUT/bench-peers.log" 2>&1; log "bench rc=$?"; tail -n 8 "$OUT/bench-peers.log" >> "$OUT/summary.txt" ;;
quality)
  timeout ${TIMEOUT:-570} "$PY" -m lit_llama_lab.cli bench --shape llama-3.2-1b --unsloth_pythonpath "$US" --steps 10 \
    --warmup 3 ${BENCH_ARGS:-} --paths ${PATHS:-baseline,$OURS,unsloth,trl+liger} --output "$OUT/bench-quality.json" \
    > "$OUT/bench-quality.log" 2>&1; log "bench rc=$?"; tail -n 6 "$OUT/bench-quality.log" >> "$OUT/summary.txt" ;;
loss)
  timeout ${TIMEOUT:-330} "$PY" -m lit_llama_lab.cli bench --shape llama-3.2-1b --paths baseline,$OURS \
    --output "$OUT/bench-loss.json" > "$OUT/bench-loss.log" 2>&1; log "bench rc=$?"
  tail -n 5 "$OUT/bench-loss.log" >> "$OUT/summary.txt"
  timeout ${CENSUS_TIMEOUT:-150} "$PY" scripts/bench_census.py ours+varlen+compile 3 > "$OUT/census.log" 2>&1
  log "census rc=$?" ;;
tests)
  timeout ${TIMEOUT:-240} "$PY" -m pytest -q -p no:cacheprovider tests/gpu -k "not peers" > "$OUT/gpu-tests.log" 2>&1
  log "gpu tests rc=$? $(tail -n 1 "$OUT/gpu-tests.log")"
  timeout ${FINETOME_TIMEOUT:-180} "$PY" -m lit_llama_lab.cli bench --shape llama-3.2-1b --workload finetome --paths $OURS \
    --steps 200 --warmup 20 --output "$OUT/finetome.json" > "$OUT/finetome.log" 2>&1
  log "finetome rc=$?"; tail -n 4 "$OUT/finetome.log" >> "$OUT/summary.txt" ;;
esac
log "done"
