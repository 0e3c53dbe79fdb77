"""The exported GGUF files in llama.cpp itself (llama-cpp-python built by ``make test-llamacpp``): its tokenizer,
its chat template, its kernels, its stop tokens; and the emoji evaluation run through it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_llama_lab.model.tokens import end_of_turn_token
from lit_llama_lab.tools.export import FIDELITY_PROMPTS, export
from lit_llama_lab.tools.export_verify import load_gguf_in_transformers
from lit_llama_lab.tools.llamacpp import INSTALL_HINT, LlamaCppModel, llama_cpp_usable

pytestmark = pytest.mark.skipif(not llama_cpp_usable(), reason=INSTALL_HINT)

TEXTS = ["Hello world", "  two spaces\n\n\ttab and newlines  ", "naïve café 🐍🎉🇺🇸 123456 3.14159",
         "I've 'RE you'll DON'T", "我想在apple工作1314151天～", "<|im_start|>user\nhi<|im_end|>",
         "<|start_header_id|>assistant<|end_header_id|>\n\nok<|eot_id|>", "------======= нещо на Български"]
# f16 weights; llama.cpp also rounds activations to f16 for its f16 matmuls. Measured: 0.0022 (tiny Llama 3),
# 0.0004 (tiny-random); see docs/export.md for SmolLM2 and the Llama-3.2-1B shape.
F16_TOLERANCE = 0.02
# The same quantized weights in llama.cpp (which also rounds activations to 8 bits) and in transformers
# (dequantized to float32): measured 0.004 (q8_0) and 0.005 (q4_0) on tiny-random.
KERNEL_TOLERANCE = 0.05


def chat_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]


@torch.no_grad()
def max_logit_gap(runtime: LlamaCppModel, model, tokenizer) -> float:
    gaps = []
    for prompt in FIDELITY_PROMPTS:
        ids = chat_ids(tokenizer, prompt)
        reference = model(torch.tensor([ids])).logits[0].float().numpy()
        gaps.append(np.abs(runtime.logits(ids) - reference).max())
    return float(max(gaps))


def check_tokenizer(runtime: LlamaCppModel, tokenizer) -> None:
    for text in TEXTS:
        assert runtime.tokenize(text) == tokenizer(text).input_ids, text
    chat = [{"role": "user", "content": "What is 🐍?"}]
    assert runtime.chat_prompt(chat) == tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    eot = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
    assert runtime.is_end_of_generation(eot) and runtime.llm.token_eos() == eot


def test_llama3_gguf_loads_with_llama_bpe_tokenizes_and_scores_as_transformers(llama3_export):
    tokenizer = AutoTokenizer.from_pretrained(llama3_export)
    runtime = LlamaCppModel(llama3_export / "gguf" / "l3-f16.gguf")
    try:
        assert runtime.pre_tokenizer == "llama-bpe" and runtime.metadata["tokenizer.ggml.add_bos_token"] == "true"
        check_tokenizer(runtime, tokenizer)
        merged = AutoModelForCausalLM.from_pretrained(llama3_export, dtype=torch.float32).eval()
        assert max_logit_gap(runtime, merged, tokenizer) < F16_TOLERANCE
    finally:
        runtime.close()


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from tests.tools.test_export import make_checkpoint

    root = tmp_path_factory.mktemp("tiny-llamacpp")
    checkpoint = make_checkpoint(root / "ckpt")
    return export(str(checkpoint), str(root / "t"), gguf="f16,q8_0,q4_0", dtype="float32", verify=False)


@pytest.mark.parametrize("qtype", ["f16", "q8_0", "q4_0"])
def test_each_type_runs_in_llama_cpp_as_its_weights_do_in_transformers(tiny_export, qtype):
    runtime = LlamaCppModel(tiny_export / "gguf" / f"t-{qtype}.gguf")
    try:
        assert runtime.pre_tokenizer == "smollm"
        model, tokenizer = load_gguf_in_transformers(tiny_export, f"gguf/t-{qtype}.gguf")
        check_tokenizer(runtime, tokenizer)
        assert max_logit_gap(runtime, model, tokenizer) < (F16_TOLERANCE if qtype == "f16" else KERNEL_TOLERANCE)
    finally:
        runtime.close()


def test_evaluate_runs_the_emoji_evaluation_in_llama_cpp(tiny_export, tmp_path):
    from lit_llama_lab.tools.evaluate import evaluate

    gguf = str(tiny_export / "gguf" / "t-f16.gguf")
    common = {"limit": 4, "max_new_tokens": 8, "batch_size": 4, "examples": 2}
    ours = evaluate(model=gguf, runtime="llamacpp", output_dir=str(tmp_path / "cpp"), **common)[0]
    theirs = evaluate(model=str(tiny_export), quantize="none", output_dir=str(tmp_path / "hf"), **common)[0]
    assert ours["metrics"]["answers"] == 4 and (tmp_path / "cpp").rglob("answers.jsonl")
    # the same reference answers, scored by llama.cpp's logits and by transformers' (float32 merge)
    assert ours["metrics"]["perplexity"] == pytest.approx(theirs["metrics"]["perplexity"], rel=1e-3)
    with pytest.raises(ValueError, match="runs .gguf files only"):
        evaluate(model=str(tiny_export), runtime="llamacpp", output_dir=str(tmp_path / "x"), **common)


@pytest.mark.slow
def test_smollm2_gguf_answers_in_llama_cpp_as_in_transformers(smol_f16_export):
    from tests.tools.test_export import PROMPTS, greedy

    _, out, merged, tokenizer = smol_f16_export
    runtime = LlamaCppModel(out / "gguf" / "smol-f16.gguf")
    try:
        assert runtime.pre_tokenizer == "smollm"
        check_tokenizer(runtime, tokenizer)
        assert max_logit_gap(runtime, merged, tokenizer) < 0.25  # measured 0.11 (logits up to ~30): f16 rounding
        chats = [[{"role": "user", "content": p}] for p in PROMPTS]
        ours = [g.token_ids for g in runtime.answer_chats(chats, max_new_tokens=12)]
        assert ours == greedy(merged, tokenizer)
        stops = [json.loads(line.split(" ", 2)[2]) for line in (out / "gguf/smol-f16.Modelfile").read_text().splitlines()
                 if line.startswith("PARAMETER stop")]
        assert runtime.is_end_of_generation(tokenizer.convert_tokens_to_ids(stops[0]))
    finally:
        runtime.close()


def quantize_binary() -> bool:
    from lit_llama_lab.tools.gguf_writer import GgufExportError, require_quantize_binary

    try:
        return bool(require_quantize_binary("q4_k_m"))
    except GgufExportError:
        return False


@pytest.mark.skipif(not quantize_binary(), reason="needs llama.cpp's llama-quantize: make llama-quantize")
def test_k_quant_made_by_llama_quantize_runs_in_llama_cpp(tmp_path):
    import gguf

    from tests.tools.test_export import make_checkpoint

    checkpoint = make_checkpoint(tmp_path / "ckpt")
    out = export(str(checkpoint), str(tmp_path / "k"), gguf="q4_k_m", dtype="float32", verify=False)
    assert sorted(p.name for p in (out / "gguf").iterdir()) == ["k-q4_k_m.Modelfile", "k-q4_k_m.gguf"]
    reader = gguf.GGUFReader(out / "gguf" / "k-q4_k_m.gguf")
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    runtime = LlamaCppModel(out / "gguf" / "k-q4_k_m.gguf")
    try:
        model, tokenizer = load_gguf_in_transformers(out, "gguf/k-q4_k_m.gguf")
        check_tokenizer(runtime, tokenizer)
        assert max_logit_gap(runtime, model, tokenizer) < KERNEL_TOLERANCE
    finally:
        runtime.close()
