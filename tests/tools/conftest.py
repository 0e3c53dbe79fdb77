"""Fixtures of the export tests, shared by the transformers and the llama.cpp proofs."""

import pytest
import torch


@pytest.fixture(scope="session")
def smol_f16_export(tmp_path_factory):
    """A SmolLM2 adapter checkpoint (random B, scale 0.01) exported merged and as f16 GGUF, once per session:
    ``(checkpoint, export folder, merged model, tokenizer)``; the GGUF is ``<folder>/gguf/smol-f16.gguf``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_llama_lab.tools.export import export
    from tests.tools.test_export import make_checkpoint

    root = tmp_path_factory.mktemp("smol_f16_export")
    checkpoint = make_checkpoint(root / "ckpt", base="smollm2-135m", scale=0.01)
    out = export(str(checkpoint), str(root / "smol"), gguf="f16", dtype="float32", verify=False)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return checkpoint, out, merged, AutoTokenizer.from_pretrained(out)
