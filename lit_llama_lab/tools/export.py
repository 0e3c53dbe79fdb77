"""Export a checkpoint: merge its LoRA adapters into the base, save an HF folder, and write GGUF files.

Which base weights the adapters are merged into matters. A QLoRA adapter learned to correct the *4-bit* base
it was trained against, so by default (``merge_into="dequantized"``) every 4-bit layer is dequantized exactly
(``bitsandbytes.functional.dequantize_4bit``) and the adapter added to that: the merged model then computes what
base+adapter computed in training. ``merge_into="original"`` adds it to the 16-bit weights the 4-bit ones were
made from instead: closer to the base model as published, but the adapter never saw those weights.
The merge itself runs in float32 on plain ``nn.Linear`` layers (peft re-quantizes when merging into 4-bit
layers, which would silently throw most of the update away).

Exports are atomic: everything is written into a hidden sibling folder, checked, then renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Literal

import torch

from lit_llama_lab.io import replace_folder, staged_folder
from lit_llama_lab.model.adapters import ADAPTER_METADATA
from lit_llama_lab.model.load import load_base_model, load_for_inference
from lit_llama_lab.model.source import TINY_RANDOM, embedded_gguf_path, resolve_model_source
from lit_llama_lab.model.tokens import fix_special_tokens
from lit_llama_lab.tools.export_verify import ExportVerificationError, check_export, failure_message
from lit_llama_lab.tools.gguf_tokenizer import adds_bos, pre_tokenizer_name
from lit_llama_lab.tools.gguf_writer import (
    GGUF_TYPES,
    K_QUANT_TYPES,
    check_architecture,
    quantize_with_llama_cpp,
    require_quantize_binary,
    write_gguf,
)

log = logging.getLogger(__name__)

EXPORT_METADATA = "export.json"
GGUF_SUBFOLDER = "gguf"
SAVE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# A fixed batch to measure how far the merged model's logits are from base+adapter's.
FIDELITY_PROMPTS = (
    "What is 🐍?",
    "Name the following emoji: 🎉",
    "Tell me what 🌋 represents.",
    "Write one sentence about the sea.",
)


class ExportError(ValueError):
    """A checkpoint or output folder that cannot be exported from or into; the message names the fix."""


def read_checkpoint(folder: Path) -> dict:
    """Check an adapter checkpoint folder before any loading; return its metadata (base model, quantize…).

    Raises :class:`ExportError` for a missing folder, a folder without ``adapter_config.json``, an adapter
    not in safetensors, or files that do not parse.
    """
    if not folder.is_dir():
        raise ExportError(f"Checkpoint {str(folder)!r} does not exist: pass an adapter folder written by training.")
    if not (folder / "adapter_config.json").is_file():
        raise ExportError(
            f"{str(folder)!r} is no adapter checkpoint: it has no adapter_config.json. Pass the folder a "
            "checkpoint callback wrote (adapter_config.json + adapter_model.safetensors)."
        )
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise ExportError(f"{str(folder)!r} has no adapter_model.safetensors (only safetensors adapters are loaded).")
    meta: dict = {}
    try:
        adapter_config = json.loads((folder / "adapter_config.json").read_text())
        if (folder / ADAPTER_METADATA).is_file():
            meta = json.loads((folder / ADAPTER_METADATA).read_text())
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as handle:
            if not list(handle.keys()):
                raise ValueError("it holds no tensors")
    except Exception as error:  # noqa: BLE001 - any parse failure means the same thing to the user
        raise ExportError(f"Checkpoint {str(folder)!r} is corrupt or incomplete ({error}); pick another one.") from error
    meta.setdefault("base_model", adapter_config.get("base_model_name_or_path"))
    meta.setdefault("quantize", "nf4")
    if not meta["base_model"]:
        raise ExportError(f"Checkpoint {str(folder)!r} names no base model; pass --base_model.")
    return meta


def is_export_folder(folder: Path) -> bool:
    """True for a folder an earlier export wrote: its ``export.json`` parses and names the merge."""
    try:
        return "merge_into" in json.loads((folder / EXPORT_METADATA).read_text())
    except (OSError, ValueError, TypeError):
        return False


def check_output(output: Path, checkpoint: Path, overwrite: bool) -> None:
    """Refuse outputs that would lose something: the checkpoint, a file, a non-empty folder that no export wrote
    (even with ``overwrite``), and an earlier export without ``overwrite``."""
    if output.resolve() == checkpoint.resolve() or output.resolve() in checkpoint.resolve().parents:
        raise ExportError(f"Output {str(output)!r} would replace the checkpoint itself; choose another folder.")
    if output.exists() and not output.is_dir():
        raise ExportError(f"Output {str(output)!r} exists and is a file; choose a folder path.")
    if not output.is_dir() or not any(output.iterdir()):
        return
    if not is_export_folder(output):
        raise ExportError(
            f"Output folder {str(output)!r} is not empty and no export wrote it (it has no {EXPORT_METADATA}), so "
            "nothing in it is replaced, with or without --overwrite. Choose another --output, or empty it yourself."
        )
    if not overwrite:
        raise ExportError(f"Output folder {str(output)!r} holds an earlier export; pass --overwrite to replace it.")


def dequantized_state_dict(model) -> dict[str, torch.Tensor]:
    """All weights of a (4-bit) model in float32, each 4-bit layer dequantized exactly as its forward pass does."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    state = {}
    for name, param in model.named_parameters():
        if isinstance(param, bnb.nn.Params4bit):
            state[name] = dequantize_4bit(param.data, param.quant_state).float().cpu()
        else:
            state[name] = param.detach().float().cpu()
    return state


def dense_base(base_model: str, merge_into: str, quantize: str):
    """The base as a float32 model of plain layers: the dequantized 4-bit weights, or the original ones."""
    from transformers import AutoModelForCausalLM

    if merge_into == "original" or quantize == "none":
        return load_base_model(base_model, quantize="none", compute_dtype=torch.float32, device="cpu")
    quantized, tokenizer = load_base_model(base_model, quantize=quantize, compute_dtype=torch.float32)
    state = dequantized_state_dict(quantized)
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(type(quantized.config).from_dict(config_dict), dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"Dequantized weights do not fit the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval(), tokenizer


def merged_model(checkpoint: Path, base_model: str, merge_into: str, quantize: str):
    """Base (see :func:`dense_base`) with the checkpoint's adapters merged in, float32, plus the tokenizer."""
    from peft import PeftModel

    base, tokenizer = dense_base(base_model, merge_into, quantize)
    model = PeftModel.from_pretrained(base, checkpoint, is_trainable=False).merge_and_unload(safe_merge=True)
    fix_special_tokens(tokenizer, model)
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


def fidelity_batch(tokenizer, prompts=FIDELITY_PROMPTS) -> dict[str, torch.Tensor]:
    """The fixed batch (chat-templated prompts, left-padded) the logit comparisons run on."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@torch.no_grad()
def logit_gap(reference, candidate, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """How far ``candidate``'s logits are from ``reference``'s on the real (non-pad) positions of ``batch``.

    Returns ``max_abs`` and ``mean_abs`` (logit units) and ``top1_agreement`` (fraction of positions whose
    argmax token matches).
    """
    keep = batch["attention_mask"].bool()
    logits = []
    for model in (reference, candidate):
        device = next(model.parameters()).device
        out = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
        logits.append(out[keep])
    gap = (logits[0] - logits[1]).abs()
    agree = (logits[0].argmax(-1) == logits[1].argmax(-1)).float().mean()
    return {"max_abs": gap.max().item(), "mean_abs": gap.mean().item(), "top1_agreement": agree.item()}


def parse_gguf_types(gguf: list[str] | str | None) -> list[str]:
    """``"f16,q8_0"``, ``["f16"]``, ``"none"`` or ``""`` → a validated list of GGUF types.

    K-quants (``q4_k_m``…) are accepted only when llama.cpp's ``llama-quantize`` is on PATH.
    """
    items = gguf.split(",") if isinstance(gguf, str) else list(gguf or [])
    types = [t.strip().lower() for t in items if t.strip() and t.strip().lower() != "none"]
    bad = [t for t in types if t not in GGUF_TYPES + K_QUANT_TYPES]
    if bad:
        raise ExportError(f"Unknown GGUF type(s) {bad}; choose from {', '.join(GGUF_TYPES)} (written natively) or "
                          f"{', '.join(K_QUANT_TYPES)} (through llama.cpp's llama-quantize), comma-separated.")
    for qtype in types:
        if qtype in K_QUANT_TYPES:
            require_quantize_binary(qtype)
    return list(dict.fromkeys(types))


def _source_gguf(base_model: str) -> Path | None:
    source = resolve_model_source(base_model)
    if source.kind == "embedded" and source.location != TINY_RANDOM:
        return embedded_gguf_path(source.location)
    return Path(source.location) if source.kind == "gguf" else None


def _write_ggufs(folder: Path, state: dict, config, tokenizer, gguf_types: list[str], name: str,
                 pre: str) -> list[str]:
    """Write each GGUF type (K-quants from the f16 file, through llama-quantize) and an Ollama Modelfile beside each
    into ``folder``; return their names. In a subfolder: transformers reads tokenizer files lying beside a GGUF
    instead of the GGUF's."""
    from lit_llama_lab.tools.ollama import write_modelfile

    folder.mkdir(exist_ok=True)
    files = []
    for qtype in gguf_types:
        path = folder / f"{name}-{qtype}.gguf"
        if qtype in K_QUANT_TYPES:
            f16 = folder / f"{name}-f16.gguf"
            source = f16 if f16.is_file() else write_gguf(folder / f".{name}-f16.tmp", state, config, tokenizer,
                                                          "f16", name=name, pre=pre)
            quantize_with_llama_cpp(source, path, qtype)
            if source != f16:
                source.unlink()
        else:
            write_gguf(path, state, config, tokenizer, qtype, name=name, pre=pre)
        write_modelfile(path, tokenizer, adds_bos(tokenizer))
        files.append(f"{folder.name}/{path.name}")
    return files


def _write_folder(tmp: Path, model, tokenizer, dtype: str, gguf_types: list[str], name: str, pre: str) -> list[str]:
    """Save the HF files and GGUF files of a merged float32 ``model`` into ``tmp``; return the GGUF file names."""
    state = {k: v for k, v in model.state_dict().items()}
    model.generation_config.do_sample = False
    model.to(SAVE_DTYPES[dtype]).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if not gguf_types:
        return []
    return _write_ggufs(tmp / GGUF_SUBFOLDER, state, model.config, tokenizer, gguf_types, name, pre)


def export(
    checkpoint: str,
    output: str,
    merge_into: Literal["dequantized", "original"] = "dequantized",
    gguf: list[str] | str = "f16,q8_0",
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
    base_model: str | None = None,
    verify: bool = True,
    overwrite: bool = False,
    gguf_pre: str | None = None,
    verify_limit: int = 200,
    verify_suites: list[str] | None = None,
    max_drop: float = 2.0,
    min_agreement: float = 0.5,
) -> Path:
    """Merge an adapter checkpoint into its base; write an HF folder (and GGUF files) at ``output``.

    Args:
        checkpoint: adapter folder (adapter_config.json + adapter_model.safetensors + lit_llama_lab.json).
        output: folder to create; holds config, model.safetensors, tokenizer, chat template, export.json and
            ``gguf/<name>-<type>.gguf`` files. Loadable by ``evaluate``/``ui`` as a folder or through a .gguf path.
        merge_into: ``dequantized``: the 4-bit weights the adapter was trained against, dequantized (default,
            matches base+adapter); ``original``: the 16-bit weights before quantization.
        gguf: GGUF types to write, comma-separated or a list: ``f16``, ``bf16``, ``q8_0``, ``q5_0``, ``q4_0``
            (written natively), K-quants like ``q4_k_m`` (through llama.cpp's ``llama-quantize`` when on PATH);
            ``none`` for no GGUF. Each GGUF gets an Ollama ``<name>-<type>.Modelfile`` beside it.
        dtype: dtype of the saved safetensors (GGUF files are written from the float32 merge).
        base_model: base to merge into instead of the one the checkpoint names (e.g. if it moved).
        verify: record each artefact's logit gap to base+adapter (4-bit) in export.json, then (``verify_limit`` > 0)
            evaluate every artefact (merged folder; each GGUF in transformers and, when llama-cpp-python is
            installed, in llama.cpp) on ``verify_limit`` emoji of the test split and ``verify_suites``; an artefact
            more than ``max_drop`` points below the adapter, or agreeing on fewer than ``min_agreement`` of the
            answers, fails the export: files kept, export.json says ``"verified": false``, and the command exits 1.
        overwrite: replace an earlier export at ``output`` (the old one is removed only after the new is complete);
            a non-empty folder without our ``export.json`` is never replaced.
        gguf_pre: llama.cpp pre-tokenizer name to write, for a tokenizer whose name is not recognised.
        verify_limit: emoji of the test split each artefact answers (0: logit gaps only).
        verify_suites: suites besides the emoji one: ``general`` (the general-ability suite, the default) or
            ``module:function`` (see :mod:`lit_llama_lab.export_verify`); ``[]`` for none.
        max_drop: largest allowed fall below the adapter on any suite score, in points.
        min_agreement: smallest allowed fraction of emoji answers identical to the adapter's.
    """
    source, target = Path(checkpoint).expanduser(), Path(output).expanduser()
    meta = read_checkpoint(source)
    check_output(target, source, overwrite)
    gguf_types = parse_gguf_types(gguf)
    base = base_model or meta["base_model"]
    model, tokenizer = merged_model(source, base, merge_into, meta["quantize"])
    pre = None
    if gguf_types:  # refuse what GGUF cannot hold before anything is written
        check_architecture(model.config)
        pre = pre_tokenizer_name(tokenizer, _source_gguf(base), gguf_pre)
    verification = None
    with staged_folder(target) as tmp:
        files = _write_folder(tmp, model, tokenizer, dtype, gguf_types, target.name, pre)
        record = {"checkpoint": str(source.resolve()), "base_model": base, "quantize": meta["quantize"],
                  "merge_into": merge_into, "dtype": dtype, "gguf": files, "gguf_pre_tokenizer": pre,
                  "global_step": meta.get("global_step")}
        if verify:
            record["logit_gap_vs_adapter"] = verify_export(tmp, source, base, files)
            log.info("Merged vs base+adapter logits: %s", record["logit_gap_vs_adapter"])
        (tmp / EXPORT_METADATA).write_text(json.dumps(record, indent=2) + "\n")
        if verify and verify_limit > 0 and base == meta["base_model"]:
            verification = check_export(tmp, source, files, verify_limit, verify_suites, max_drop, min_agreement)
        for path in (tmp, *tmp.rglob("*")):  # mkdtemp/mkstemp make owner-only folders and files
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        check_output(target, source, overwrite)  # again: the folder may have been filled while we worked
        replace_folder(tmp, target)
    print(f"Exported {source} -> {target} ({merge_into} base, {dtype}; GGUF: {', '.join(files) or 'none'})")
    if verification is not None and not verification["verified"]:
        raise ExportVerificationError(failure_message(target, verification))
    return target


def verify_export(folder: Path, checkpoint: Path, base_model: str, gguf_files: list[str]) -> dict[str, dict]:
    """Logit gaps (see :func:`logit_gap`) to base+adapter as trained (4-bit), on :data:`FIDELITY_PROMPTS`:
    of the saved safetensors model and of each GGUF file as transformers loads it, all run in float32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if base_model != read_checkpoint(checkpoint)["base_model"]:
        return {}  # base+adapter as trained cannot be rebuilt from another base
    config = AutoConfig.from_pretrained(folder)
    reference, tokenizer = load_for_inference(str(checkpoint), compute_dtype="float32")
    batch = fidelity_batch(tokenizer)
    gaps = {}
    for name in ["model.safetensors", *gguf_files]:
        path = folder / name
        # the export's config for GGUFs too: transformers' GGUF reader drops Llama 3's rope scaling
        kwargs = {"gguf_file": path.name} if name.endswith(".gguf") else {"use_safetensors": True}
        candidate = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, config=config,
                                                         **kwargs).eval()
        gaps[name] = logit_gap(reference, candidate, batch)
    return gaps
