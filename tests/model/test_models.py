import json

import pytest
import torch

from lit_llama_lab.generation import generate
from lit_llama_lab.model.load import load_base_model
from lit_llama_lab.model.source import ACCEPTED_FORMS, ModelNotFoundError, resolve_model_source
from lit_llama_lab.model.tokens import fix_special_tokens


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
    from lit_llama_lab.model.folders import converted_folder

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


def test_a_missing_local_path_shaped_like_a_hub_id_fails_at_once(tmp_path, monkeypatch):
    """`exports/emoji` with an `exports/` folder here is a missing path, not a hub id: no network, the forms named."""
    from lit_llama_lab.tools.evaluate import evaluate

    monkeypatch.chdir(tmp_path)
    (tmp_path / "exports").mkdir()
    for name, reason in [("exports/emoji", "exports/ is a folder here"), ("runs/adapter.safetensors", ".safetensors file"),
                         ("./emoji", "it is a path"), ("~/models/x", "it is a path")]:
        with pytest.raises(ModelNotFoundError, match=reason) as error:
            resolve_model_source(name)
        assert ACCEPTED_FORMS in str(error.value) and name in str(error.value)
    with pytest.raises(ModelNotFoundError, match="exports/ is a folder here"):
        evaluate(model="exports/emoji", split="test", limit=4, output_dir=str(tmp_path / "eval"))
    assert resolve_model_source("someone/emoji").kind == "hub"  # no local `someone/`: it can be a hub id


def test_a_hub_id_offline_fails_fast_with_one_message(tmp_path):
    """No network (a closed port stands for the hub): one message naming the offline fact, not 50 s of retries."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path / "hub"), PYTHONPATH=str(root))
    command = [sys.executable, "-m", "lit_llama_lab.cli", "evaluate", "--model", "someone/some-model", "--split",
               "test", "--limit", "4", "--output_dir", str(tmp_path / "eval")]
    started = time.monotonic()
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - started
    assert done.returncode != 0
    error = done.stderr.strip().splitlines()[-1]
    assert "Cannot download hub model 'someone/some-model': http://127.0.0.1:9 cannot be reached" in error
    assert "looks offline" in error and "Use a local form instead" in error
    assert seconds < 45, seconds  # imports included; the hub is asked once, without retries
    offline = subprocess.run(command, cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                             text=True, timeout=300)
    assert "is not in the hub cache" in offline.stderr and "HF_HUB_OFFLINE is set" in offline.stderr


def test_a_truncated_or_missing_adapter_file_is_named_with_the_fix(tmp_path):
    from peft import LoraConfig, get_peft_model

    from lit_llama_lab.tools.evaluate import evaluate

    base, _ = load_base_model("tiny-random", quantize="none", compute_dtype=torch.float32, device="cpu")
    folder = tmp_path / "last"
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(folder)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted copy
    with pytest.raises(ValueError, match=f"{weights} is truncated or corrupt .*Pick another checkpoint"):
        evaluate(model=str(folder), split="test", limit=2, output_dir=str(tmp_path / "eval"))
    weights.unlink()
    with pytest.raises(ValueError, match=f"{folder} has no adapter_model.safetensors"):
        evaluate(model=str(folder), split="test", limit=2, output_dir=str(tmp_path / "eval"))


def test_writing_a_random_model_leaves_the_callers_rng_where_it_was(tmp_path):
    """A cold cache writes the random models; that must not shift the RNG stream the LoRA init then draws from
    (on a fresh machine the first run would start from other adapters than the second: found on the GPU host)."""
    from lit_llama_lab.model.folders import make_tiny_llama
    from lit_llama_lab.model.random_llama3 import make_random_llama3

    def draw_after(write) -> torch.Tensor:
        torch.manual_seed(0)
        write()
        return torch.rand(4)

    untouched = draw_after(lambda: None)
    assert torch.equal(draw_after(lambda: make_tiny_llama(tmp_path / "tiny")), untouched)
    assert torch.equal(draw_after(lambda: make_random_llama3(tmp_path / "llama3")), untouched)
    assert (tmp_path / "tiny" / "config.json").is_file() and (tmp_path / "llama3" / "config.json").is_file()
