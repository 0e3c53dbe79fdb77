#!/usr/bin/env bash
# Wheels for the two peer training stacks benchmarked beside ours on the offline GPU host (Python 3.12, torch
# 2.11.0+cu130, triton 3.6.0, transformers 5.17, peft, lightning, tensorboard preinstalled). Findings, the host-side
# install and the bench calls: docs/peers.md. Each folder stays <= 60 MiB (one device call carries 64 MiB).
#   .whl3  Unsloth 2026.10.9 + unsloth_zoo and everything they need beyond the host (trl 1.15.0, datasets 4.8.5 <5,
#          torchao 0.18.0, torchvision 0.26.0+cu130, ...). Install it together with .whl's slim bitsandbytes, in a
#          site of its own: NOT beside .whl2 (transformers 5.24; Unsloth pins <=5.17) nor .whl's datasets 5.2.0
#          (Unsloth pins datasets <5). xformers is left out on purpose: the registry's only build for torch >= 2.10
#          (0.0.35) is compiled for torch 2.10.0+cu128 (needs libcudart.so.12); Unsloth uses PyTorch SDPA without it.
#   .whl4  TRL 1.16.0 + liger-kernel 0.8.5 (+ accelerate); with .whl (bitsandbytes, datasets 5.2.0, dill, multiprocess).
# Options (environment):
#   DEST=DIR      where the folders go (default: the repository root; pass DEST=/tmp/x to try it elsewhere)
#   SLIM=1        strip studio/ (Unsloth's web UI, never imported by `import unsloth`) from the Unsloth wheel:
#                 .whl3 goes from ~57 to ~32 MiB, so it can travel in the same call as .whl
#   WITH_ARROW=1  also .whl5 (pyarrow, xxhash) and .whl6 (pandas, python-dateutil, tzdata): needed only if the host
#                 lacks them (it has them today: our datasets 5.2.0 runs there with only dill + multiprocess carried)
# Idempotent: a wheel already present at the pinned version is kept, anything else in the folder is removed.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=${DEST:-$here}
PY=${PYTHON:-python3}
SLIM=${SLIM:-0}
WITH_ARROW=${WITH_ARROW:-0}
LIMIT=$((60 * 1024 * 1024))
plat=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform any)

WHL3=(unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 accelerate==1.15.0 datasets==4.8.5 fsspec==2026.2.0
      dill==0.4.1 multiprocess==0.70.19 torchvision==0.26.0 torchao==0.18.0 cut_cross_entropy==25.1.1 tyro==1.0.17
      typeguard==4.6.1 docstring_parser==0.18.0 sentencepiece==0.2.3 msgspec==0.23.0 hf_transfer==0.1.9
      diffusers==0.42.1 importlib_metadata==10.2.0 zipp==4.1.2 lazy_importer==0.1.0 einops==0.8.2 json5==0.17.3
      structlog==26.1.0 nest_asyncio==1.6.0 wheel==0.48.0 requests==2.34.2 urllib3==2.8.0 charset_normalizer==3.5.3)
WHL4=(trl==1.16.0 liger_kernel==0.8.5 accelerate==1.15.0)
WHL5=(pyarrow==26.0.1 xxhash==4.1.0)
WHL6=(pandas==3.1.1 python_dateutil==4.0.0 tzdata==2026.6)

# prefix NAME==VERSION: how the wheel's file name starts (wheel names are lower case, with _ for - and .)
prefix() { local n=${1%%==*} v=${1##*==}; n=$(echo "$n" | tr 'A-Z.-' 'a-z__'); echo "$n-$v-"; }

# is_slim FILE: the Unsloth wheel has no studio/ entries
is_slim() { "$PY" - "$1" <<'PY'
import sys, zipfile
sys.exit(0 if not any(n.startswith("studio/") for n in zipfile.ZipFile(sys.argv[1]).namelist()) else 1)
PY
}

slim_unsloth() { "$PY" - "$1" <<'PY'
import os, sys, zipfile
src = sys.argv[1]; tmp = src + ".tmp"
with zipfile.ZipFile(src) as zi, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zo:
    for info in zi.infolist():
        if info.filename.startswith("studio/"):
            continue
        data = zi.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line + b"\n" for line in data.splitlines() if not line.startswith(b"studio/"))
        elif info.filename.endswith(".dist-info/top_level.txt"):
            data = b"".join(line + b"\n" for line in data.splitlines() if line != b"studio")
        zo.writestr(info, data)
os.replace(tmp, src)
PY
}

# fill FOLDER PINS...: the folder holds exactly these wheels
fill() {
  local name=$1; local dir=$DEST/$1; shift
  mkdir -p "$dir"
  local keep=() pin p f
  for pin in "$@"; do
    p=$(prefix "$pin")
    f=$(ls "$dir" | grep -i "^${p}.*\.whl$" | head -1 || true)
    if [[ $pin == unsloth==* && -n $f ]]; then   # a full wheel when SLIM=1 (or a slim one when SLIM=0): fetch anew
      if is_slim "$dir/$f"; then [[ $SLIM == 1 ]] || { rm -f "$dir/$f"; f=; }; else [[ $SLIM != 1 ]] || { rm -f "$dir/$f"; f=; }; fi
    fi
    if [[ -z $f ]]; then
      "$PY" -m pip download -q "${plat[@]}" -d "$dir" "$pin" 2>&1 | grep -v "^WARNING: Location" || true
      f=$(ls "$dir" | grep -i "^${p}.*\.whl$" | head -1 || true)
      [[ -n $f ]] || { echo "ERROR: no wheel for $pin" >&2; exit 1; }
      if [[ $pin == unsloth==* && $SLIM == 1 ]]; then slim_unsloth "$dir/$f"; fi
    fi
    keep+=("$f")
  done
  for f in $(ls -A "$dir"); do   # drop what is not pinned (stale versions, partial downloads)
    [[ " ${keep[*]} " == *" $f "* ]] || { echo "removing stale $name/$f"; rm -rf "${dir:?}/$f"; }
  done
  local size; size=$(du -cb "$dir"/*.whl | tail -1 | cut -f1)
  (( size <= LIMIT )) || { echo "ERROR: $name is $((size / 1048576)) MiB, over 60 MiB" >&2; exit 1; }
  # keep the folder out of git, so it travels to the device only when asked (as gpu-wheelhouse.sh does)
  if [[ -d $DEST/.git ]]; then grep -qx "/$name/" "$DEST/.git/info/exclude" 2>/dev/null || echo "/$name/" >> "$DEST/.git/info/exclude"; fi
}

fill .whl3 "${WHL3[@]}"
fill .whl4 "${WHL4[@]}"
folders=(.whl3 .whl4)
if [[ $WITH_ARROW == 1 ]]; then fill .whl5 "${WHL5[@]}"; fill .whl6 "${WHL6[@]}"; folders+=(.whl5 .whl6); fi

for d in "${folders[@]}"; do
  printf '%-6s %6.1f MiB  %2d wheels\n' "$d" "$(du -cb "$DEST/$d"/*.whl | tail -1 | cut -f1 | awk '{print $1/1048576}')" \
    "$(ls "$DEST/$d"/*.whl | wc -l)"
done
cat <<'TXT'
On the GPU host (each folder in its own call; keep them under /root/gpu between calls):
  Unsloth: python3 -m pip install -q --no-index --no-deps --target /tmp/site_unsloth .whl/bitsandbytes-*.whl .whl3/*.whl
           PYTHONPATH=/tmp/site_unsloth python3 ...      (not /tmp/site: transformers 5.24 / datasets 5.2 live there)
  TRL:     python3 -m pip install -q --no-index --no-deps --target /tmp/site_trl .whl/*.whl .whl4/*.whl
           PYTHONPATH=/tmp/site_trl python3 ...          (add .whl2 for transformers 5.24 as in our runs)
TXT
