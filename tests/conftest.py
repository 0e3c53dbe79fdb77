"""Shared fixtures: the real embedded SmolLM2 and the tiny random Llama, loaded once per session."""

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smol_tokenizer():
    from lit_llama_lab.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def smol_4bit():
    """The real SmolLM2-135M in 4-bit NF4 (fp32 compute on CPU): (model, tokenizer)."""
    from lit_llama_lab.models import load_base_model

    return load_base_model("smollm2-135m", quantize="nf4", compute_dtype=torch.float32, device="cpu")


@pytest.fixture(scope="session")
def tiny_base():
    from lit_llama_lab.models import load_base_model

    return load_base_model("tiny-random", quantize="none", compute_dtype=torch.float32, device="cpu")
