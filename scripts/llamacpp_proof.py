"""The GGUF writer proven in llama.cpp: a model is written to GGUF by our writer, loaded by llama.cpp (llama-cpp-python),
and compared with transformers: the pre-tokenizer llama.cpp picked, tokenization of a set of texts, and the logits of
chat prompts: float32 transformers vs each GGUF type in llama.cpp, and the same quantized weights (dequantized) in
transformers vs llama.cpp, which separates llama.cpp's kernels from the rounding of the type. Prints a Markdown
table (docs/export.md).

    python scripts/llamacpp_proof.py --model tiny --types f16,q8_0,q4_0      # random Llama 3, real 3.2 tokenizer
    python scripts/llamacpp_proof.py --model 1b --types f16,q8_0              # Llama-3.2-1B shape, random weights
    python scripts/llamacpp_proof.py --model smollm2-135m --types f16,q8_0    # the real SmolLM2 weights

Needs llama-cpp-python (``make test-llamacpp`` builds it). The 1B run needs ~12 GB of memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lit_llama_lab.model.load import load_base_model
from lit_llama_lab.model.tokens import fix_special_tokens
from lit_llama_lab.tools.export import FIDELITY_PROMPTS
from lit_llama_lab.tools.gguf_tokenizer import pre_tokenizer_name
from lit_llama_lab.tools.gguf_writer import write_gguf
from lit_llama_lab.tools.llamacpp import LlamaCppModel

TEXTS = ["Hello world", "  two spaces\n\n\ttab and newlines  ", "naïve café 🐍🎉🇺🇸 123456 3.14159",
         "I've 'RE you'll DON'T", "我想在apple工作1314151天～", "------======= нещо на Български",
         "<|start_header_id|>assistant<|end_header_id|>\n\nok<|eot_id|>", "<|im_start|>user\nhi<|im_end|>",
         "def f(x):\n    return x ** 2  # square", "https://example.org/a?b=c&d=e"]
PROMPTS = (*FIDELITY_PROMPTS, "Translate to French: the cat sleeps on the warm windowsill.",
           "List three prime numbers greater than 100.")


def load(name: str):
    """(float32 model, tokenizer) for ``tiny``/``1b`` (random Llama 3) or a base model name."""
    if name in ("tiny", "1b"):
        from lit_llama_lab.model.random_llama3 import random_llama3

        model, tokenizer = random_llama3(name)
    else:
        model, tokenizer = load_base_model(name, quantize="none", compute_dtype=torch.float32, device="cpu")
    fix_special_tokens(tokenizer, model)
    return model.eval(), tokenizer


def gaps(ours_by_prompt: list[np.ndarray], theirs_by_prompt: list[np.ndarray]) -> tuple[float, float, float]:
    """max and mean |Δlogit| over every position of every prompt, and the top-1 agreement."""
    diff = np.concatenate([np.abs(a - b).ravel() for a, b in zip(ours_by_prompt, theirs_by_prompt, strict=True)])
    top1 = np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(ours_by_prompt, theirs_by_prompt, strict=True)])
    return float(diff.max()), float(diff.mean()), float(top1.mean())


@torch.no_grad()
def transformers_logits(folder: Path, path: Path, reference: dict) -> list[np.ndarray]:
    """Logits of the GGUF's own (dequantized) weights in transformers, with the original config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=path.name, dtype=torch.float32,
                                                 config=AutoConfig.from_pretrained(folder)).eval()
    out = [model(torch.tensor([ids])).logits[0].float().numpy() for ids, _ in reference.values()]
    del model
    return out


def measure(path: Path, folder: Path, tokenizer, reference: dict) -> dict:
    """One GGUF in llama.cpp: its pre-tokenizer, texts tokenized as transformers does, logit gaps to the float32
    model, and to the same (dequantized) weights run by transformers, which isolates llama.cpp's kernels."""
    runtime = LlamaCppModel(path, n_ctx=256)
    same = sum(runtime.tokenize(t) == tokenizer(t).input_ids for t in TEXTS)
    ours = [runtime.logits(ids) for ids, _ in reference.values()]
    pre = runtime.pre_tokenizer
    runtime.close()
    max_abs, mean_abs, top1 = gaps(ours, [logits for _, logits in reference.values()])
    kernel_max, _, _ = gaps(ours, transformers_logits(folder, path, reference))
    return {"pre": pre, "tokenized_equal": f"{same}/{len(TEXTS)}", "max_abs": max_abs, "mean_abs": mean_abs,
            "top1": top1, "kernel_max_abs": kernel_max,
            "logit_scale": float(max(np.abs(v[1]).max() for v in reference.values()))}


@torch.no_grad()
def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny, 1b, or a base model name (smollm2-135m)")
    parser.add_argument("--types", default="f16,q8_0,q4_0")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    model, tokenizer = load(args.model)
    print(f"loaded {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters) in "
          f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
    reference = {}
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
        reference[prompt] = (ids, model(torch.tensor([ids])).logits[0].float().numpy())
    pre, rows, written = pre_tokenizer_name(tokenizer), [], {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model.config.save_pretrained(folder)
        for qtype in args.types.split(","):
            start = time.perf_counter()
            write_gguf(folder / f"{qtype}.gguf", model.state_dict(), model.config, tokenizer, qtype, args.model, pre)
            written[qtype] = time.perf_counter() - start
        del model  # memory for the 1B shape: the GGUFs are measured one at a time
        for qtype, seconds in written.items():
            path = folder / f"{qtype}.gguf"
            rows.append({"model": args.model, "type": qtype, "MB": round(path.stat().st_size / 1e6, 1),
                         "write_s": round(seconds, 1), **measure(path, folder, tokenizer, reference)})
            path.unlink()
            print(json.dumps(rows[-1]), file=sys.stderr)
    print("| model | type | size (MB) | write (s) | pre-tokenizer | texts tokenized as transformers | max \\|Δlogit\\| "
          "| mean \\|Δlogit\\| | top-1 agreement | largest \\|logit\\| | max \\|Δlogit\\|, same weights in transformers |")
    print("|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['type']} | {r['MB']} | {r['write_s']} | {r['pre']} | {r['tokenized_equal']} | "
              f"{r['max_abs']:.4f} | {r['mean_abs']:.5f} | {100 * r['top1']:.1f}% | {r['logit_scale']:.1f} | "
              f"{r['kernel_max_abs']:.4f} |")
    return rows


if __name__ == "__main__":
    main()
