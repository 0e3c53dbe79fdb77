# Sourced on the GPU host after `source scripts/gpu_setup.sh`: installs the peers' wheels that arrived (.whl3, .whl4;
# built on the CPU machine by `SLIM=1 bash scripts/peer_wheelhouse.sh`) and sets US, Unsloth's PYTHONPATH.
#   .whl4 (TRL + Liger) into /tmp/site, beside our stack (transformers 5.24, datasets 5.2);
#   .whl3 (Unsloth) into /tmp/unsloth-site with .whl's wheels except datasets and transformers, so Unsloth gets the
#   host's transformers 5.17 and its own datasets 4.8.5.
# Versions go to $OUT/summary.txt.
mkdir -p /root/gpu/whl3 /root/gpu/whl4
for d in whl3 whl4; do [ -d .$d ] && cp .$d/*.whl /root/gpu/$d/; done
# a call that carries no wheels reuses the sites and the versions read by the call that installed them: importing
# unsloth to read its version takes most of a minute of device time
NEW=$( [ -d .whl3 ] || [ -d .whl4 ] && echo 1 )
[ -n "$NEW" ] && ls /root/gpu/whl4/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site --upgrade /root/gpu/whl4/*.whl 2>&1 | grep -v -i warn
if ls /root/gpu/whl3/*.whl >/dev/null 2>&1 && { [ -d .whl3 ] || [ ! -d /tmp/unsloth-site/unsloth ]; }; then  # .whl first, then .whl3 over it (dill, multiprocess: its versions)
  rm -rf /tmp/unsloth-site
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/unsloth-site \
    $(ls /root/gpu/whl/*.whl | grep -v -E '/(datasets|transformers)-') 2>&1 | grep -v -i warn
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/unsloth-site --upgrade /root/gpu/whl3/*.whl 2>&1 | grep -v -i warn
fi
US=/tmp/unsloth-site:$PWD:/root/smol/site-packages  # Unsloth's PYTHONPATH: the host's transformers 5.17, not /tmp/site's
if [ -n "$NEW" ] || [ ! -s /tmp/peer-versions.txt ]; then
  { python3 -c "import trl, liger_kernel.transformers; print('trl', trl.__version__)"
    PYTHONPATH=$US python3 -c "import unsloth, transformers; print('unsloth', unsloth.__version__, 'transformers', transformers.__version__)"
  } > /tmp/peer-versions.txt 2>&1
fi
cat /tmp/peer-versions.txt >> "$OUT/summary.txt"
