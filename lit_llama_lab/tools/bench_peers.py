"""The peers ``lit-llama-lab bench`` runs beside ours: what a practitioner would pick instead of this project.

``trl`` is TRL's ``SFTTrainer`` as a tuned Hugging Face user configures it. The base is loaded in 4-bit as the other
paths load it (NF4, double quantization). The LoRA goes through ``SFTTrainer``'s ``peft_config`` (TRL 1.16 runs no
``prepare_model_for_kbit_training``; it keeps the adapters in bf16 on a GPU), and the batches are padding-free
packed rows. Its loss is ``SFTTrainer.compute_loss``
(TRL's fused LM head and its metrics included), under bf16 autocast on a GPU, which is what the HF Trainer's
``bf16=True`` does through accelerate. ``trl+liger`` adds ``use_liger_kernel`` (Liger's Triton kernels, GPU only).

``unsloth`` is Unsloth's ``FastLanguageModel``: ``from_pretrained(load_in_4bit=True)``, then ``get_peft_model``
with the same rank, alpha and targets, and Unsloth's gradient checkpointing when checkpointing is on. It runs on a
GPU with the ``unsloth`` package installed in the bench's process (``docs/peers.md`` says how, offline). ``import
unsloth`` patches transformers and must come before it: run the path isolated, in a process that imports unsloth
first (``scripts/gpu_peers.sh``). Its batches carry ``packed_seq_lengths``, the document lengths Unsloth's own
collator adds, so its attention keeps packed documents apart as every other path does.

Every peer gets the same batches, rank, targets, AdamW and steps as ``ours`` (:func:`bench_measure.train_steps`).
"""

from __future__ import annotations

import tempfile

import torch

from lit_llama_lab.model.load import load_base_model
from lit_llama_lab.model.precision import resolve_compute_dtype
from lit_llama_lab.train.args import LoraArgs

PEERS = ("trl", "trl+liger", "unsloth")


def document_lengths(position_ids: torch.Tensor) -> torch.Tensor:
    """The lengths of the packed documents of every row, row after row (int32, on the CPU): a document starts where
    its position id is 0. Unsloth's packed attention reads them as ``packed_seq_lengths``."""
    lengths = []
    for row in position_ids.cpu():
        starts = (row == 0).nonzero().flatten().tolist() + [row.numel()]
        lengths += [b - a for a, b in zip(starts[:-1], starts[1:], strict=True) if b > a]
    return torch.tensor(lengths, dtype=torch.int32)


def one_packed_row(batch: dict) -> dict:
    """A bench batch as TRL's padding-free collator hands it to Unsloth: every row's tokens back to back in one row
    ``[1, tokens]``, padding dropped, ``packed_seq_lengths`` summing to the row's length, and the label of each
    document's first token ignored (Unsloth's collator masks that boundary, where a document's last token would
    predict the next document's first). Unsloth's packed attention reads the lengths over the whole batch, so rows of
    ``[rows, width]`` with lengths over all rows do not fit it."""
    from lit_llama_lab.data.masking import IGNORE_INDEX

    keep = batch["document_ids"] >= 0 if "document_ids" in batch else torch.ones_like(batch["input_ids"], dtype=torch.bool)
    row = {k: batch[k][keep].unsqueeze(0) for k in ("input_ids", "position_ids", "labels")}
    row["labels"] = row["labels"].masked_fill(row["position_ids"] == 0, IGNORE_INDEX)
    return {**row, "packed_seq_lengths": document_lengths(row["position_ids"])}


def _inputs(batch: dict) -> dict:
    """What a peer's forward takes of a bench batch: packed rows with restarting position ids (transformers builds
    the block-diagonal mask from them) and the labels."""
    return {k: batch[k] for k in ("input_ids", "position_ids", "labels")}


def build_trl(name: str, rank: int, checkpointing: bool, device: torch.device, seed: int, liger: bool = False,
              **_) -> tuple:
    """TRL's SFTTrainer step (see the module docstring). Returns ``(model, loss_fn, prepare)``.

    ``Trainer.train()`` applies Liger's kernels and turns activation checkpointing on; the bench calls no ``train()``,
    so the builder does both here, as ``train()`` does them."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    if liger and device.type != "cuda":
        raise ValueError("trl+liger needs a GPU: Liger's kernels are Triton kernels. Use the trl path on a CPU.")
    cuda = device.type == "cuda"
    base, tokenizer = load_base_model(name, "nf4", resolve_compute_dtype("auto", device), device, "sdpa")
    folder = tempfile.TemporaryDirectory(prefix="bench-trl-")  # the trainer's output_dir; removed with loss_fn
    config = SFTConfig(output_dir=folder.name, bf16=cuda, use_cpu=not cuda, seed=seed,
                       gradient_checkpointing=checkpointing, use_liger_kernel=liger, padding_free=True, packing=True,
                       learning_rate=2e-4, report_to=[], save_strategy="no", logging_strategy="no")
    trainer = SFTTrainer(model=base, args=config, train_dataset=Dataset.from_dict({"input_ids": [[0]]}),
                         peft_config=LoraArgs(r=rank, alpha=rank).peft_config(), processing_class=tokenizer)
    model = trainer.model
    if liger:
        from transformers.integrations.liger import apply_liger_kernel

        apply_liger_kernel(model, config.liger_kernel_config)
    if checkpointing:
        kwargs = dict(getattr(config, "activation_checkpointing_kwargs", None)
                      or getattr(config, "gradient_checkpointing_kwargs", None) or {})
        kwargs.pop("every_n_layers", None), kwargs.pop("offload", None)
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs or None)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)

    def loss_fn(batch: dict) -> torch.Tensor:
        return trainer.compute_loss(model, _inputs(batch))

    import trl

    loss_fn.folder = folder
    adapter_dtype = next(p.dtype for p in model.parameters() if p.requires_grad)
    loss_fn.runs = (f"TRL {trl.__version__} SFTTrainer.compute_loss, peft LoRA (adapters in {str(adapter_dtype)[6:]}, "
                    f"no k-bit preparation), padding-free packed rows, sdpa, autocast {'bf16' if cuda else 'none'}"
                    + (", checkpointing" if checkpointing else "") + (", Liger kernels" if liger else ""))
    return model, loss_fn, lambda batch: batch


def build_unsloth(name: str, rank: int, checkpointing: bool, device: torch.device, seed: int, **_) -> tuple:
    """Unsloth's FastLanguageModel QLoRA (see the module docstring). Returns ``(model, loss_fn, prepare)``."""
    if device.type != "cuda":
        raise ValueError("The unsloth path needs a GPU: Unsloth runs on CUDA only.")
    try:
        import unsloth  # noqa: F401  (the process should have imported it before transformers: gpu_peers.sh)
        from unsloth import FastLanguageModel
    except ImportError as error:
        raise ValueError(f"The unsloth path needs the unsloth package ({error}); docs/peers.md says how to install it "
                         "offline, in a site of its own.") from None
    from lit_llama_lab.model.folders import model_folder

    folder = str(model_folder(name))
    model, _ = FastLanguageModel.from_pretrained(model_name=folder, max_seq_length=8192, dtype=torch.bfloat16,
                                                 load_in_4bit=True)  # a local folder: no hub access
    lora = LoraArgs(r=rank, alpha=rank)
    model = FastLanguageModel.get_peft_model(model, r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none",
                                             target_modules=list(lora.peft_config().target_modules),
                                             use_gradient_checkpointing="unsloth" if checkpointing else False,
                                             random_state=seed)

    def loss_fn(batch: dict) -> torch.Tensor:  # packed documents kept apart, as Unsloth's own collator asks
        return model(**_inputs(batch), packed_seq_lengths=batch["packed_seq_lengths"]).loss

    def prepare(batch: dict) -> dict:  # once, before the timed steps: reading the lengths waits for the GPU
        return one_packed_row(batch)

    loss_fn.runs = (f"Unsloth {unsloth.__version__} FastLanguageModel (load_in_4bit, get_peft_model"
                    + (", its gradient checkpointing: checkpoints offloaded to host memory)" if checkpointing else ")")
                    + ", one padding-free row with packed_seq_lengths, as TRL's collator gives it")
    return model, loss_fn, prepare


def peer_options(path: str) -> tuple:
    """``(builder, options)`` of a peer path, or ``None`` when ``path`` is no peer."""
    # amp: bf16 autocast on a GPU, as the HF Trainer's bf16=True (through accelerate) runs both peers
    if path == "trl":
        return build_trl, {"amp": True}
    if path == "trl+liger":
        return build_trl, {"amp": True, "liger": True}
    if path == "unsloth":
        return build_unsloth, {"amp": True}
    return None
