"""QLoRAModule: a 4-bit (NF4, double-quantized) base model with LoRA/rsLoRA/DoRA adapters, trained by Lightning.

Only adapter weights train and only they go into checkpoints; the frozen base is reloaded from its source.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.aggregation import MeanMetric
from torchmetrics.text import Perplexity

from lit_llama_lab.data.masking import IGNORE_INDEX, labelled_next_tokens
from lit_llama_lab.data.packing import pad_packed_batch
from lit_llama_lab.distill import distilled_label_loss
from lit_llama_lab.fast import (
    DECODER_KEYS,
    cache_dequantized_weights,
    checkpoint_kwargs,
    compile_decoder_layers,
    dequantized_bytes,
    fast_label_loss,
    final_hidden,
    keep_fp32_activations,
    use_attention,
    varlen_keys,
    varlen_unsupported,
)
from lit_llama_lab.fsdp import check_strategy, clean_name, is_fsdp, wrap_for_fsdp
from lit_llama_lab.graphs import GraphedLoss
from lit_llama_lab.init_adapter import apply_init_adapter, read_init_adapter
from lit_llama_lab.models import load_base_model, resolve_compute_dtype, resolve_quant_storage

log = logging.getLogger(__name__)
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraArgs:
    """LoRA adapter settings.

    Args:
        r: adapter rank.
        alpha: scaling numerator: the update is scaled by alpha/r, or alpha/sqrt(r) with rsLoRA.
        dropout: dropout on the adapter input.
        target_modules: module names that get adapters (default: all attention and MLP projections).
        use_rslora: rank-stabilized scaling alpha/sqrt(r).
        use_dora: weight-decomposed adapters (DoRA).
    """

    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))
    use_rslora: bool = False
    use_dora: bool = False

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            use_rslora=self.use_rslora,
            use_dora=self.use_dora,
            task_type="CAUSAL_LM",
        )


def labelled_hidden(model, batch: dict, decoder_keys: tuple[str, ...] = DECODER_KEYS):
    """Run the decoder and keep the final hidden states of positions whose next token is labelled.

    ``decoder_keys`` present in ``batch`` go to the decoder (the mask, ``position_ids``, varlen's offsets). Returns
    ``(causal_lm, hidden [n, d], targets [n])``, where ``causal_lm`` is the model under any peft wrapper (its
    ``get_output_embeddings`` is the vocab projection).
    """
    causal_lm, hidden = final_hidden(model, batch, decoder_keys)
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    return causal_lm, hidden[:, :-1][keep], targets[keep]


def label_loss(model, batch: dict, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy over labelled positions only.

    The vocabulary projection runs only where a label exists, so prompt and padding tokens never build
    full-vocabulary logits. Returns ``(loss, logits, targets)`` of the labelled positions.
    """
    causal_lm, hidden, targets = labelled_hidden(model, batch)
    logits = causal_lm.get_output_embeddings()(hidden).float()
    loss = F.cross_entropy(logits, targets, reduction=reduction)
    return loss, logits, targets


class QLoRAModule(L.LightningModule):
    """Fine-tune a Llama-architecture model with LoRA adapters over a (by default 4-bit) frozen base.

    Args:
        name_or_path: base model: ``smollm2-135m`` (embedded), a local HF folder, a .gguf file or a hub id.
        quantize: ``nf4`` (4-bit NormalFloat, double quantization), ``fp4`` or ``none`` (plain weights).
        compute_dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``bfloat16``, ``float16`` or ``float32``.
        lora: adapter settings.
        learning_rate: AdamW peak learning rate (a warmup callback may scale it).
        weight_decay: AdamW weight decay on adapter weights.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        attn_implementation: ``auto`` (the default: ``varlen`` when the model is on a CUDA GPU that FlashAttention
            supports, Ampere or newer, with a bf16/fp16 compute dtype and torch has ``torch.nn.attention.varlen``;
            else ``sdpa``), ``varlen`` (refused where it cannot run), ``sdpa``, ``eager`` or ``flex_attention``.
            ``varlen`` trains packed batches through FlashAttention varlen from per-document offsets of a fixed size
            (:func:`lit_llama_lab.fast.varlen_keys`), so no ``[rows, 1, width, width]`` mask reaches the step and
            CUDA graphs can replay it; validation (our 4-D mask) and generation run through sdpa. The resolved
            choice is ``self.attention``.
        cuda_graphs: on a GPU, replay each training step's forward and backward from a CUDA graph (one per batch
            shape; same kernels, same math): removes the per-kernel launch overhead that dominates small models.
        graph_pad_multiple: with ``cuda_graphs``, packed rows are padded to a multiple of this many tokens so
            batches fall into few shapes (each shape is one capture and its own activation memory).
        quant_storage: dtype the packed 4-bit weights are stored in: ``auto`` (uint8, or the compute dtype under
            ``--trainer.strategy fsdp``, which can only shard floating tensors of one dtype), ``uint8``, ``bfloat16``,
            ``float16`` or ``float32``. Outputs are the same in every storage dtype.
        fp32_activations: keep the hidden states between matmuls (residual stream, norms, MLP activations, each
            adapter's sum with its frozen projection) in fp32 while matmuls and attention run in the bf16/fp16 compute
            dtype (no effect in fp32): the plain stack's numerics without its fp32 weights.
            See :func:`lit_llama_lab.fast.keep_fp32_activations`.
        compile: ``torch.compile`` each decoder layer (with gradient checkpointing the compiled layer is recomputed
            whole in backward: :func:`lit_llama_lab.fast.checkpoint_kwargs`). ``auto``: on when training on one CUDA
            GPU a model of hidden size >= 1024 (Llama-3.2-1B and up), where the step's arithmetic is worth fusing
            and tens of seconds of compilation pay for themselves; off for small models such as SmolLM2-135M, whose
            steps CUDA graphs already make cheap, on CPUs, and under DDP/FSDP. ``true`` / ``false`` force it
            (``true`` is refused under FSDP).
        dequantize_once: keep each frozen 4-bit layer's weight dequantized (in the compute dtype) for the whole run
            instead of dequantizing it at every forward and backward (:func:`lit_llama_lab.fast.cache_dequantized_weights`):
            the same values, a few kernels fewer per projection, at the cost of the weights' 16-bit size in memory.
            ``auto``: on when training on CUDA and that copy takes at most 1 GiB (SmolLM2-135M: 0.2 GB; off for
            Llama-3.2-1B, whose 4-bit memory is the point), off on CPUs and under FSDP. ``true`` / ``false`` force it.
        tf32: on a CUDA GPU, run fp32 matmuls on TF32 tensor cores (``torch.set_float32_matmul_precision("high")``,
            a process-wide setting): with fp32 activations these are the adapters' matmuls, which otherwise run on
            plain fp32 cores. Inputs keep 10 mantissa bits and sums stay fp32: finer than the bf16 the plain stack
            computes them in under autocast. The 4-bit base matmuls run in the compute dtype either way.
        init_adapter: an adapter folder (a checkpoint's ``last/``, an export's adapter) whose weights the new adapters
            start from, e.g. a chat adapter trained with ``configs/finetome.yaml`` before the emoji run. Its base,
            rank, alpha, rsLoRA/DoRA and target modules must be this run's (refused otherwise, naming both values).
            The replay answers (``--data.replay``) then come from base + this adapter.
        distill_weight: weight of KL(base ‖ model) on the tokens of replay chats (``--data.replay.ratio`` > 0), added
            to the cross-entropy: the base is this model with its adapters disabled, one extra forward pass without
            gradients a step (:func:`lit_llama_lab.distill.distilled_label_loss`). 0 turns it off.
    """

    def __init__(
        self,
        name_or_path: str = "smollm2-135m",
        quantize: Literal["nf4", "fp4", "none"] = "nf4",
        compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto",
        lora: LoraArgs | None = None,
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        gradient_checkpointing: bool = False,
        attn_implementation: Literal["auto", "varlen", "sdpa", "eager", "flex_attention"] = "auto",
        cuda_graphs: bool = True,
        graph_pad_multiple: int = 128,
        quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = "auto",
        fp32_activations: bool = True,
        compile: bool | Literal["auto"] = "auto",
        dequantize_once: bool | Literal["auto"] = "auto",
        tf32: bool = True,
        init_adapter: str | None = None,
        distill_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.lora = lora or LoraArgs()
        self.save_hyperparameters(ignore=["lora"])
        self.hparams["lora"] = vars(self.lora)
        self.model = None
        self.tokenizer = None
        self.strict_loading = False  # checkpoints hold adapter weights only
        self.val_ppl = Perplexity(ignore_index=IGNORE_INDEX)
        self.val_loss = MeanMetric()
        self._graphed: GraphedLoss | None = None
        self.attention: str | None = None  # attn_implementation resolved by configure_model

    def configure_model(self) -> None:
        """Load the base and attach adapters, once (Lightning may call this more than once).

        Under FSDPStrategy the adapter leaves and decoder layers become FSDP units here (see
        :func:`lit_llama_lab.fsdp.wrap_for_fsdp`); Lightning then wraps the whole module as the root unit.
        """
        if self.model is not None:
            return
        from peft import get_peft_model

        strategy = self.trainer.strategy if self._trainer is not None else None
        check_strategy(strategy)
        init_state = (read_init_adapter(self.hparams.init_adapter, self.hparams.name_or_path, self.lora)
                      if self.hparams.init_adapter else None)  # a wrong adapter is refused before the base loads
        compute_dtype = resolve_compute_dtype(self.hparams.compute_dtype)
        base, self.tokenizer = load_base_model(
            self.hparams.name_or_path,
            quantize=self.hparams.quantize,
            compute_dtype=compute_dtype,
            device=strategy.root_device if strategy is not None else None,
            attn_implementation="sdpa" if self.hparams.attn_implementation in ("auto", "varlen")
            else self.hparams.attn_implementation,
            quant_storage=resolve_quant_storage(self.hparams.quant_storage, compute_dtype, sharded=is_fsdp(strategy)),
        )
        base.config.use_cache = False
        if self.hparams.tf32 and next(base.parameters()).is_cuda:
            torch.set_float32_matmul_precision("high")
        self.attention = self.resolve_attention(base)
        if self.attention == "varlen":
            use_attention(base, "varlen")
        compiled = self.use_compile(base, strategy)
        if self.hparams.fp32_activations:
            keep_fp32_activations(base)
        if self.hparams.gradient_checkpointing:
            # Checkpointing saves the RNG state to replay dropout, which a CUDA graph capture cannot do; without
            # dropout there is nothing to replay. With dropout, training runs eagerly.
            if self.hparams.cuda_graphs and self.lora.dropout > 0:
                log.warning("cuda_graphs is off: gradient checkpointing with LoRA dropout > 0 cannot be captured.")
                self.hparams.cuda_graphs = False
            base.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=checkpoint_kwargs(compiled, preserve_rng_state=not self.hparams.cuda_graphs))
        self.model = get_peft_model(base, self.lora.peft_config())
        if init_state is not None:
            apply_init_adapter(self.model, init_state, self.hparams.init_adapter)
            log.info("Adapters start from %s (%d tensors).", self.hparams.init_adapter, len(init_state))
        if self.use_dequantize_once(base, strategy):
            cache_dequantized_weights(self.model)
        if compiled:
            compile_decoder_layers(self.model)
        # from_pretrained returns the model in eval mode and Lightning set this module's mode before the model
        # existed: without this, dropout and gradient checkpointing (both need .training) would be off in training
        self.model.train(self.training)
        if is_fsdp(strategy):
            wrap_for_fsdp(self.model, strategy.root_device)

    def resolve_attention(self, base) -> str:
        """The attention to train with: ``attn_implementation`` with ``auto`` resolved (see the class docstring)."""
        setting = self.hparams.attn_implementation
        if setting not in ("auto", "varlen"):
            return setting
        reason = varlen_unsupported(base)
        if reason is None:
            return "varlen"
        if setting == "varlen":
            raise ValueError(f"attn_implementation=varlen cannot run here: {reason}. Use auto or sdpa.")
        log.info("Attention: sdpa with the packed-batch mask (FlashAttention varlen is off: %s).", reason)
        return "sdpa"

    def _switch(self, name: str, strategy, fsdp_reason: str) -> bool | None:
        """A ``true | false | auto`` setting: its bool, or None for ``auto``; bad values and ``true`` under FSDP
        (for ``fsdp_reason``) are refused."""
        setting = self.hparams[name]
        if setting not in (True, False, "auto"):
            raise ValueError(f"{name}={setting!r}: use true, false or auto.")
        if setting is True and is_fsdp(strategy):
            raise ValueError(f"{name}=true is not supported under FSDP ({fsdp_reason}); use --model.{name} false.")
        return None if setting == "auto" else setting

    def use_compile(self, base, strategy) -> bool:
        """Whether to compile the decoder layers (the ``compile`` setting resolved; see the class docstring)."""
        setting = self._switch("compile", strategy, "compiled layers inside FSDP units")
        if setting is not None:
            return setting
        on_gpu = next(base.parameters()).is_cuda
        return on_gpu and self.trainer_world_size() == 1 and base.config.hidden_size >= 1024

    def use_dequantize_once(self, base, strategy) -> bool:
        """Whether to keep the 4-bit weights dequantized (the ``dequantize_once`` setting resolved)."""
        setting = self._switch("dequantize_once", strategy, "each rank would hold every full weight")
        if setting is not None:
            return setting
        on_gpu = next(base.parameters()).is_cuda
        return on_gpu and not is_fsdp(strategy) and 0 < dequantized_bytes(base) <= 2**30

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable (adapter) parameters, keyed as in this module's single-device state dict.

        Under FSDP the values are this rank's shards; :func:`lit_llama_lab.fsdp.gather_adapter_state_dict` gathers
        full ones.
        """
        return {clean_name(name): p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def training_loss(self, batch: dict) -> torch.Tensor:
        """Mean next-token cross-entropy over the labelled tokens of ``batch``.

        On a GPU with ``cuda_graphs``: fixed-shape (:func:`~lit_llama_lab.fast.fast_label_loss`) and replayed from
        CUDA graphs. Elsewhere: logits at labelled positions only (:func:`label_loss`). Both compute the same loss.
        With varlen attention a packed batch (``document_ids`` and ``max_documents``, from
        :class:`~lit_llama_lab.data.datamodule.ChatDataModule`) goes to the model without its 4-D mask, as
        FlashAttention varlen offsets (:func:`~lit_llama_lab.fast.varlen_keys`), on both paths.
        """
        varlen = self.attention == "varlen" and "document_ids" in batch and "max_documents" in batch
        if varlen:  # the mask is neither read nor, on the graphed path, copied into the graph's inputs
            batch = {k: v for k, v in batch.items() if k != "attention_mask"}
        distill = self.hparams.distill_weight > 0 and "distill_mask" in batch
        loss_fn = partial(distilled_label_loss, weight=self.hparams.distill_weight) if distill else fast_label_loss
        if self.hparams.cuda_graphs and batch["input_ids"].is_cuda and self.trainer_world_size() == 1:
            if self._graphed is None:
                self._graphed = GraphedLoss(self.model, loss_fn)
            padded = pad_packed_batch(batch, self.hparams.graph_pad_multiple, self.tokenizer.pad_token_id)
            if varlen:
                padded = {**padded, **varlen_keys(padded["document_ids"], batch["max_documents"])}
            return self._graphed(padded)
        if varlen:
            batch = {**batch, **varlen_keys(batch["document_ids"], batch["max_documents"])}
        return loss_fn(self.model, batch) if distill else label_loss(self.model, batch)[0]

    def trainer_world_size(self) -> int:
        """Processes training together (1 without a trainer). CUDA graphs are used on one process only: captured
        collectives (DDP's all-reduce, FSDP's gathers) are not supported here."""
        return self.trainer.world_size if self._trainer is not None else 1

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.training_loss(batch)
        # ChatDataModule counts on the CPU; counting a GPU batch here would wait for the GPU
        labelled = batch.get("num_labelled") or labelled_next_tokens(batch["labels"])
        self.log("train_loss", loss, batch_size=labelled)
        if self.global_step % 10 == 0:  # the progress bar reads its values every step: a GPU value would wait
            self.log("loss", loss.detach().cpu(), prog_bar=True, logger=False, batch_size=labelled)
        # a CPU tensor: a Python float would be copied to the GPU, waiting for every queued kernel
        self.log("train_tokens", torch.tensor(float(batch["input_ids"].numel())), reduce_fx="sum", batch_size=1)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, logits, targets = label_loss(self.model, batch)
        self.val_loss.update(loss, weight=targets.numel())
        self.val_ppl.update(logits.unsqueeze(0), targets.unsqueeze(0))
        self.log("val_loss", self.val_loss, prog_bar=True, on_epoch=True, batch_size=targets.numel())
        self.log("val_ppl", self.val_ppl, on_epoch=True, batch_size=targets.numel())

    def test_step(self, batch: dict, batch_idx: int) -> None:
        loss, _, targets = label_loss(self.model, batch)
        self.log("test_loss", loss, on_epoch=True, batch_size=targets.numel())

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(
            params,
            lr=self.hparams.learning_rate,
            weight_decay=self.hparams.weight_decay,
            fused=params[0].is_cuda,
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        adapter = set(self.adapter_state_dict())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in adapter}
        # plain JSON types only (peft's dict holds enums and sets), so torch.load(weights_only=True) reads it
        config = self.model.peft_config["default"].to_dict()
        checkpoint["adapter_config"] = json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        from lit_llama_lab.resume import check_resume

        check_resume(self, checkpoint)  # refuses settings the saved state cannot honour; applies a new learning rate
        self.configure_model()
        missing = set(self.adapter_state_dict()) - set(checkpoint["state_dict"])
        if missing:
            raise ValueError(
                f"The checkpoint lacks {len(missing)} adapter weights of this model (e.g. {sorted(missing)[0]}): "
                "it was written for other LoRA settings (rank or target modules)."
            )
