"""Export: merged logits equal base+adapter's, GGUF round trips through transformers, bad input loses nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_llama_lab.generation import generate
from lit_llama_lab.model.load import load_base_model, load_for_inference
from lit_llama_lab.tools.export import ExportError, export, fidelity_batch, logit_gap
from lit_llama_lab.tools.gguf_writer import write_gguf
from lit_llama_lab.tools.llamacpp import llama_cpp_usable

PROMPTS = ["What is 🐍?", "Name the following emoji: 🎉", "Tell me a story about a cat.", "2+2="]
# Merged (float32 save) vs base+adapter in 4-bit, both run in float32: only summation order differs.
MERGE_TOLERANCE = 1e-4
# Q8_0 rounds each weight to 1/127 of its block's largest magnitude; measured 0.010-0.013 on tiny-random.
Q8_0_TOLERANCE = 0.05


def make_checkpoint(folder: Path, base: str = "tiny-random", scale: float = 0.05, seed: int = 0) -> Path:
    """An adapter checkpoint as training writes it, with random B matrices so that merging changes the model."""
    model, _ = load_base_model(base, quantize="nf4", compute_dtype=torch.float32, device="cpu")
    config = LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM", target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * scale
    peft_model.save_pretrained(folder)
    (folder / "lit_llama_lab.json").write_text(json.dumps({"base_model": base, "quantize": "nf4", "global_step": 3}))
    return folder


def load_gguf(path: Path):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def greedy(model, tokenizer, prompts=PROMPTS) -> list[list[int]]:
    chats = [[{"role": "user", "content": p}] for p in prompts]
    tokenizer.padding_side = "left"
    return [g.token_ids for g in generate(model, tokenizer, chats, max_new_tokens=12, temperature=0.0)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "step-3")


@pytest.fixture(scope="module")
def fp16_export(checkpoint, tmp_path_factory) -> Path:
    """One export with both GGUF types; float16 safetensors so the F16 GGUF holds exactly the same weights."""
    return export(str(checkpoint), str(tmp_path_factory.mktemp("exports") / "tiny"), dtype="float16", verify=False)


def test_merged_logits_equal_adapter_logits(checkpoint, tmp_path):
    reference, tokenizer = load_for_inference(str(checkpoint), compute_dtype="float32")
    base, _ = load_for_inference("tiny-random", compute_dtype="float32")
    batch = fidelity_batch(tokenizer)
    assert logit_gap(reference, base, batch)["max_abs"] > 100 * MERGE_TOLERANCE  # the adapter matters
    out = export(str(checkpoint), str(tmp_path / "merged"), gguf="none", dtype="float32", verify=False)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert logit_gap(reference, merged, batch)["max_abs"] < MERGE_TOLERANCE


def test_merge_into_original_is_further_from_the_trained_model(checkpoint, tmp_path):
    gaps = {}
    for merge_into in ("dequantized", "original"):
        out = export(str(checkpoint), str(tmp_path / merge_into), merge_into=merge_into, gguf="", dtype="float32",
                     verify_limit=0)
        gaps[merge_into] = json.loads((out / "export.json").read_text())["logit_gap_vs_adapter"]["model.safetensors"]
    assert gaps["dequantized"]["max_abs"] < MERGE_TOLERANCE < gaps["original"]["max_abs"]


def test_exported_folder_holds_tokenizer_config_and_metadata(fp16_export, checkpoint):
    names = {p.name for p in fp16_export.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
            "export.json", "gguf"} <= names
    assert sorted(os.listdir(fp16_export / "gguf")) == ["tiny-f16.Modelfile", "tiny-f16.gguf", "tiny-q8_0.Modelfile",
                                                        "tiny-q8_0.gguf"]
    tokenizer = AutoTokenizer.from_pretrained(fp16_export)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    generation = json.loads((fp16_export / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id and generation["pad_token_id"] == tokenizer.pad_token_id
    record = json.loads((fp16_export / "export.json").read_text())
    assert record["merge_into"] == "dequantized" and record["global_step"] == 3
    assert not [n for n in os.listdir(fp16_export.parent) if n.startswith(".")]  # no temp leftovers


def test_f16_gguf_round_trip_gives_same_greedy_answers(fp16_export, tmp_path):
    merged = AutoModelForCausalLM.from_pretrained(fp16_export, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(fp16_export)
    gguf_model, gguf_tokenizer = load_gguf(fp16_export / "gguf" / "tiny-f16.gguf")
    for name in ("eos_token", "pad_token", "bos_token", "chat_template"):
        assert getattr(gguf_tokenizer, name) == getattr(tokenizer, name), name
    text = "Hi <|im_start|>user naïve 🐍 123\n\n  x"
    assert gguf_tokenizer(text).input_ids == tokenizer(text).input_ids
    assert logit_gap(merged, gguf_model, fidelity_batch(tokenizer))["max_abs"] < 1e-4
    assert greedy(gguf_model, gguf_tokenizer) == greedy(merged, tokenizer)


def test_q8_0_gguf_logits_are_close(fp16_export, tmp_path):
    merged = AutoModelForCausalLM.from_pretrained(fp16_export, dtype=torch.float32).eval()
    gguf_model, _ = load_gguf(fp16_export / "gguf" / "tiny-q8_0.gguf")
    gap = logit_gap(merged, gguf_model, fidelity_batch(AutoTokenizer.from_pretrained(fp16_export)))
    assert 0 < gap["max_abs"] < Q8_0_TOLERANCE  # no top-1 check here: tiny-random's logits are near-ties
    assert (fp16_export / "gguf/tiny-q8_0.gguf").stat().st_size < 0.7 * (fp16_export / "gguf/tiny-f16.gguf").stat().st_size


def test_load_base_model_accepts_exported_folder_and_gguf(fp16_export, monkeypatch, tmp_path):
    merged = AutoModelForCausalLM.from_pretrained(fp16_export, dtype=torch.float32).eval()
    monkeypatch.setenv("LIT_LLAMA_LAB_CACHE", str(tmp_path / "cache"))  # the GGUF is converted into this cache
    for source in (fp16_export, fp16_export / "gguf" / "tiny-f16.gguf"):
        model, tokenizer = load_base_model(str(source), quantize="none", compute_dtype=torch.float32, device="cpu")
        assert tokenizer.eos_token == "<|im_end|>"
        assert logit_gap(merged, model, fidelity_batch(tokenizer))["max_abs"] < 1e-2  # GGUF path stores bf16


def test_cli_runs_export(checkpoint, tmp_path):
    from lit_llama_lab.cli import main

    main(["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "cli"), "--gguf", "q8_0",
          "--verify", "false"])
    assert sorted(os.listdir(tmp_path / "cli" / "gguf")) == ["cli-q8_0.Modelfile", "cli-q8_0.gguf"]


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        export(str(tmp_path / "nope"), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no adapter_config.json"):
        export(str(tmp_path / "empty"), str(tmp_path / "out"))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text("{}")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": trunc")
    with pytest.raises(ExportError, match="corrupt"):
        export(str(corrupt), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_overwrite_replaces_only_an_earlier_export(checkpoint, tmp_path):
    """A folder no export wrote is never emptied, --overwrite or not; an earlier export is replaced only with
    --overwrite, which the CLI takes as a bare flag."""
    from lit_llama_lab.cli import main

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(ExportError, match="no export wrote it .*with or without --overwrite"):
            export(str(checkpoint), str(notes), gguf="none", verify=False, overwrite=overwrite)
    with pytest.raises(ExportError, match="no export wrote it"):
        main(["export", "--checkpoint", str(checkpoint), "--output", str(notes), "--gguf", "none", "--overwrite"])
    with pytest.raises(ExportError, match="replace the checkpoint"):
        export(str(checkpoint), str(checkpoint.parent), gguf="none", overwrite=True)
    with pytest.raises(ExportError, match="Unknown GGUF"):
        export(str(checkpoint), str(tmp_path / "x"), gguf="q4_k")
    assert os.listdir(notes) == ["thesis.txt"] and (notes / "thesis.txt").read_text() == "keep me"
    assert (checkpoint / "adapter_model.safetensors").is_file()

    out = export(str(checkpoint), str(tmp_path / "out"), gguf="none", verify=False)
    (out / "stale.txt").write_text("from the earlier export's day")
    with pytest.raises(ExportError, match="holds an earlier export; pass --overwrite"):
        export(str(checkpoint), str(out), gguf="none", verify=False)
    main(["export", "--checkpoint", str(checkpoint), "--output", str(out), "--gguf", "none", "--overwrite",
          "--verify", "false"])
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()


def test_failed_export_leaves_nothing_and_keeps_old_output(checkpoint, tmp_path):
    """A base whose rope scaling GGUF export refuses fails after the safetensors are written: nothing may show."""
    from transformers import LlamaForCausalLM

    base, tokenizer = load_base_model("tiny-random", quantize="none", compute_dtype=torch.float32, device="cpu")
    base.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    LlamaForCausalLM(base.config).save_pretrained(tmp_path / "scaled-base")
    tokenizer.save_pretrained(tmp_path / "scaled-base")
    out = tmp_path / "exports" / "model"
    out.mkdir(parents=True)
    (out / "old.txt").write_text("old export")
    (out / "export.json").write_text(json.dumps({"merge_into": "dequantized"}))  # an earlier export of ours
    with pytest.raises(ValueError, match="rotary"):
        export(str(checkpoint), str(out), base_model=str(tmp_path / "scaled-base"), overwrite=True)
    assert sorted(os.listdir(out.parent)) == ["model"] and sorted(os.listdir(out)) == ["export.json", "old.txt"]


@pytest.mark.proof
def test_verify_tables_every_artefact_and_fails_on_a_perturbed_gguf(checkpoint, tmp_path, capsys):
    """export --verify answers a test-split sample with each artefact; a GGUF whose weights were damaged after the
    export answers unlike the adapter, so verifying the folder again fails, keeping the files, marked unverified."""
    out = export(str(checkpoint), str(tmp_path / "v"), gguf="f16", dtype="float32", verify_limit=4)
    record = json.loads((out / "export.json").read_text())
    assert record["verified"] is True and "| artefact | runtime |" in capsys.readouterr().out
    rows = {(r["artefact"], r["runtime"]) for r in record["verification"]["rows"]}
    assert {("adapter", "transformers"), ("merged", "transformers"), ("gguf/v-f16.gguf", "transformers")} <= rows
    assert (("gguf/v-f16.gguf", "llamacpp") in rows) == llama_cpp_usable()  # llama.cpp itself, when built
    adapter = record["verification"]["rows"][0]
    assert adapter["agreement"] == 1.0 and adapter["drop_points"] == 0 and record["verification"]["sample"] == 4
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    noisy = {k: v + 0.5 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
             for k, v in merged.state_dict().items()}
    write_gguf(out / "gguf" / "v-f16.gguf", noisy, merged.config, AutoTokenizer.from_pretrained(out), "f16", "v",
               pre="smollm")
    from lit_llama_lab.cli import main

    with pytest.raises(SystemExit, match=r"gguf/v-f16.gguf \(transformers, emoji.*verified\": false"):
        main(["verify-export", "--output", str(out), "--limit", "4"])  # exit status 1, the failure named
    record = json.loads((out / "export.json").read_text())
    assert record["verified"] is False and (out / "gguf" / "v-f16.gguf").is_file()
    failed = {r["artefact"] for r in record["verification"]["rows"] if not r["ok"]}
    assert failed == {"gguf/v-f16.gguf"}  # in transformers and, when built, in llama.cpp


@pytest.mark.slow
def test_smollm2_merge_and_f16_gguf_round_trip(smol_f16_export):
    checkpoint, out, merged, tokenizer = smol_f16_export
    reference, _ = load_for_inference(str(checkpoint), compute_dtype="float32")
    gap = logit_gap(reference, merged, fidelity_batch(tokenizer))
    assert gap["max_abs"] < 1e-3 and gap["top1_agreement"] == 1.0
    gguf_model, gguf_tokenizer = load_gguf(out / "gguf" / "smol-f16.gguf")
    assert greedy(gguf_model, gguf_tokenizer) == greedy(merged, tokenizer)
