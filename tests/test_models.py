import json

import pytest
import torch

from lit_llama_lab.generation import generate
from lit_llama_lab.models import (
    ACCEPTED_FORMS,
    ModelNotFoundError,
    fix_special_tokens,
    load_base_model,
    resolve_model_source,
)


def test_resolve_accepted_forms(tmp_path):
    assert resolve_model_source("smollm2-135m").kind == "embedded"
    assert resolve_model_source("SmolLM2-135M").kind == "embedded"
    assert resolve_model_source("unsloth/Llama-3.2-1B-Instruct").kind == "hub"
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_source(str(tmp_path)).kind == "folder"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model_source(str(gguf)) .kind == "gguf"


@pytest.mark.parametrize("bad", ["smollm3-999m", "./no/such/folder", "/tmp/missing.gguf", "a/b/c"])
def test_unknown_model_lists_accepted_forms(bad):
    with pytest.raises(ModelNotFoundError) as error:
        resolve_model_source(bad)
    assert bad in str(error.value) and ACCEPTED_FORMS in str(error.value)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model_source(str(tmp_path))


def test_embedded_tokenizer_tokens_fixed(smol_tokenizer):
    tok = smol_tokenizer
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.pad_token == "<|endoftext|>"


def test_converted_folder_is_clean_safetensors():
    from lit_llama_lab.models import converted_folder

    folder = converted_folder(resolve_model_source("smollm2-135m"))
    assert (folder / "model.safetensors").is_file()
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.gguf"))
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == "<|im_end|>" and tok_config["pad_token"] != "<|im_end|>"


def test_pad_equal_to_eos_is_fixed(smol_tokenizer):
    tok = smol_tokenizer.__class__.from_pretrained(smol_tokenizer.name_or_path)
    tok.pad_token = tok.eos_token = "<|im_start|>"  # what a raw GGUF conversion reads
    fix_special_tokens(tok)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id != tok.eos_token_id


def test_pad_equal_to_eos_without_spare_token_is_refused(smol_tokenizer):
    tok = smol_tokenizer.__class__.from_pretrained(smol_tokenizer.name_or_path)
    tok.chat_template = None
    tok.eos_token = tok.pad_token = tok.unk_token = "<|im_end|>"
    vocab = tok.get_vocab()
    assert "<|endoftext|>" in vocab  # the one spare token; make it eos's twin to leave none
    tok.unk_token = None
    tok.eos_token = "<|endoftext|>"
    tok.pad_token = "<|endoftext|>"
    with pytest.raises(ValueError, match="pad token equals eos"):
        fix_special_tokens(tok)


@pytest.mark.slow
def test_smollm2_loads_in_4bit(smol_4bit):
    import bitsandbytes as bnb

    model, tok = smol_4bit
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit)
    assert q.weight.quant_type == "nf4" and q.weight.quant_state.nested  # double quantization
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.slow
def test_greedy_generation_stops_at_eos(smol_4bit):
    model, tok = smol_4bit
    chats = [[{"role": "user", "content": "Say hello in one word."}], [{"role": "user", "content": "What is 2+2?"}]]
    answers = generate(model, tok, chats, max_new_tokens=48)
    assert all(a.stopped for a in answers), [a.text for a in answers]
    assert all(a.text and "<|im_end|>" not in a.text for a in answers)


def test_quantize_none_gives_plain_linear(tiny_base):
    model, _ = tiny_base
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear


def test_tiny_random_4bit_forward():
    model, tok = load_base_model("tiny-random", quantize="nf4", compute_dtype=torch.float32, device="cpu")
    ids = tok("hello world", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()
