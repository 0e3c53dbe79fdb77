"""GGUF writing without llama.cpp: Llama 3 rope and tokenizer metadata, llama.cpp's pre-tokenizer choice, the native
types, Ollama Modelfiles, and the errors for what GGUF cannot hold. The llama.cpp proofs are in test_llamacpp.py."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from lit_llama_lab.model.tokens import end_of_turn_token, fix_special_tokens
from lit_llama_lab.tools.export import ExportError, export, fidelity_batch, logit_gap, parse_gguf_types
from lit_llama_lab.tools.export_verify import load_gguf_in_transformers
from lit_llama_lab.tools.gguf_tokenizer import TokenizerExportError, pre_tokenizer_name
from lit_llama_lab.tools.gguf_writer import (
    GgufExportError,
    check_architecture,
    llama3_rope_factors,
    require_quantize_binary,
)
from lit_llama_lab.tools.ollama import chat_frame, modelfile_text, stop_strings

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 🐍?"},
        {"role": "assistant", "content": "A snake."}, {"role": "user", "content": "And 🎉?"}]
# Measured on tiny-random (hidden 64) against the float32 merge, logits of the fidelity prompts: 0.013, 0.17, 0.31.
TYPE_TOLERANCE = {"bf16": 0.05, "q5_0": 0.5, "q4_0": 1.0}


@pytest.fixture(scope="module")
def llama3_tokenizer(tiny_llama3):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama3)
    fix_special_tokens(tokenizer)
    return tokenizer


def test_pre_tokenizer_is_chosen_as_llama_cpp_chooses(llama3_tokenizer, smol_tokenizer):
    assert pre_tokenizer_name(llama3_tokenizer) == "llama-bpe"
    assert pre_tokenizer_name(smol_tokenizer) == "smollm"
    assert pre_tokenizer_name(smol_tokenizer, override="gpt-2") == "gpt-2"
    from tokenizers import pre_tokenizers

    other = AutoTokenizer.from_pretrained(smol_tokenizer.name_or_path)
    other.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    with pytest.raises(TokenizerExportError, match="--gguf_pre"):
        pre_tokenizer_name(other)


def test_llama3_rope_freqs_turn_default_frequencies_into_transformers_llama3_ones(tiny_llama3):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_llama3)
    factors = torch.from_numpy(llama3_rope_factors(config)).double()
    default, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    llama3 = LlamaRotaryEmbedding(config).inv_freq
    assert factors.shape == (32,) and factors.min() == 1.0 and factors.max() == 32.0
    torch.testing.assert_close(default.double() / factors, llama3.double(), rtol=1e-6, atol=0)


def test_llama3_gguf_holds_rope_freqs_pre_tokenizer_and_turn_tokens(llama3_export, llama3_tokenizer):
    reader = gguf.GGUFReader(llama3_export / "gguf" / "l3-f16.gguf")
    keys = ("pre", "add_bos_token", "bos_token_id", "eos_token_id", "eot_token_id")
    field = {f"tokenizer.ggml.{k}": reader.fields[f"tokenizer.ggml.{k}"].contents() for k in keys}
    field["tokenizer.chat_template"] = reader.fields["tokenizer.chat_template"].contents()
    assert field["tokenizer.ggml.pre"] == "llama-bpe" and field["tokenizer.ggml.add_bos_token"] is True
    assert field["tokenizer.ggml.bos_token_id"] == 128000
    assert field["tokenizer.ggml.eos_token_id"] == field["tokenizer.ggml.eot_token_id"] == 128009  # <|eot_id|>
    assert field["tokenizer.chat_template"] == llama3_tokenizer.chat_template
    tensors = {t.name: t for t in reader.tensors}
    assert "rope_freqs.weight" in tensors and tensors["rope_freqs.weight"].n_elements == 32
    assert json.loads((llama3_export / "export.json").read_text())["gguf_pre_tokenizer"] == "llama-bpe"


@pytest.mark.parametrize("which", ["smollm2", "llama3"])
def test_modelfile_template_and_stops_match_the_tokenizer(which, smol_tokenizer, llama3_tokenizer):
    tokenizer = smol_tokenizer if which == "smollm2" else llama3_tokenizer
    frame = chat_frame(tokenizer)
    rebuilt = frame.preamble + "".join(
        frame.frames[m["role"]][0] + m["content"] + frame.frames[m["role"]][1] for m in CHAT) + frame.generation
    assert rebuilt == tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    eot = end_of_turn_token(tokenizer)
    assert stop_strings(tokenizer)[0] == eot == tokenizer.eos_token
    text = modelfile_text("m.gguf", tokenizer, adds_bos=which == "llama3")
    assert text.startswith("FROM ./m.gguf\n") and f"PARAMETER stop {json.dumps(eot)}" in text
    opener = {"smollm2": "<|im_start|>", "llama3": "<|start_header_id|>"}[which]
    assert stop_strings(tokenizer) == [eot, opener]
    if which == "smollm2":  # the template's own default system prompt, for chats without one
        assert 'SYSTEM "You are a helpful AI assistant named SmolLM, trained by Hugging Face"' in text
    else:
        assert "SYSTEM" not in text and "<|begin_of_text|>" not in text  # Ollama adds bos itself (add_bos_token)


GO_RENDER = """package main

import ("encoding/json"; "os"; "strings"; "text/template")

type Message struct { Role string; Content string }

func main() {
	modelfile, _ := os.ReadFile(os.Args[1])
	text := string(modelfile)
	start := strings.Index(text, "TEMPLATE \\"\\"\\"") + 12
	end := strings.Index(text[start:], "\\"\\"\\"") + start
	var messages []Message
	json.Unmarshal([]byte(os.Args[2]), &messages)
	tmpl := template.Must(template.New("t").Parse(text[start:end]))
	if err := tmpl.Execute(os.Stdout, map[string]any{"Messages": messages}); err != nil { panic(err) }
}
"""


@pytest.mark.skipif(shutil.which("go") is None, reason="needs Go's text/template (apt-get install golang-go)")
@pytest.mark.parametrize("which", ["smollm2", "llama3"])
def test_modelfile_template_renders_in_go_as_the_chat_template(which, smol_tokenizer, llama3_tokenizer, tmp_path):
    """Ollama renders TEMPLATE with Go's text/template: the same engine renders it here."""
    tokenizer = smol_tokenizer if which == "smollm2" else llama3_tokenizer
    (tmp_path / "Modelfile").write_text(modelfile_text("m.gguf", tokenizer, adds_bos=which == "llama3"))
    (tmp_path / "render.go").write_text(GO_RENDER)
    done = subprocess.run(["go", "run", str(tmp_path / "render.go"), str(tmp_path / "Modelfile"), json.dumps(CHAT)],
                          capture_output=True, text=True, cwd=tmp_path, env={"HOME": str(tmp_path),
                          "GOCACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin:/usr/lib/go/bin"})
    assert done.returncode == 0, done.stderr
    expected = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert done.stdout == expected.removeprefix(tokenizer.bos_token if which == "llama3" else "")


def test_native_types_round_trip_through_transformers(tiny_base, tmp_path):
    from tests.tools.test_export import make_checkpoint

    checkpoint = make_checkpoint(tmp_path / "ckpt")
    out = export(str(checkpoint), str(tmp_path / "t"), gguf="bf16,q5_0,q4_0", dtype="float32", verify=False)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    batch = fidelity_batch(AutoTokenizer.from_pretrained(out))
    sizes = {}
    for qtype, tolerance in TYPE_TOLERANCE.items():
        path = out / "gguf" / f"t-{qtype}.gguf"
        model, _ = load_gguf_in_transformers(out, f"gguf/{path.name}")
        assert 0 < logit_gap(merged, model, batch)["max_abs"] < tolerance, qtype
        assert (out / "gguf" / f"t-{qtype}.Modelfile").is_file()
        sizes[qtype] = path.stat().st_size
    assert sizes["q4_0"] < sizes["q5_0"] < sizes["bf16"]


def test_bad_gguf_requests_name_the_fix():
    with pytest.raises(ExportError, match="q4_k_m.*llama-quantize"):
        parse_gguf_types("f16,q3_0")
    try:
        require_quantize_binary("q4_k_m")
    except GgufExportError:  # only where the binary is missing: the K-quant is refused before any work
        with pytest.raises(GgufExportError, match="llama-quantize binary.*make llama-quantize"):
            parse_gguf_types("q4_k_m")
    with pytest.raises(GgufExportError, match="Llama-architecture models only.*--gguf none"):
        check_architecture(Qwen2Config())


def test_unsupported_rope_refuses_before_writing(tiny_base, tmp_path):
    from tests.tools.test_export import make_checkpoint

    base, tokenizer = tiny_base
    config = type(base.config).from_dict({**base.config.to_dict(), "rope_parameters": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "rope_theta": 10000.0}})
    folder = tmp_path / "yarn-base"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    checkpoint = make_checkpoint(tmp_path / "ckpt", base=str(folder))
    with pytest.raises(GgufExportError, match="'yarn'; pass --gguf none"):
        export(str(checkpoint), str(tmp_path / "out"), gguf="f16")
    assert not Path(tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

