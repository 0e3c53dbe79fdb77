"""QLoRAModule: a 4-bit (NF4, double-quantized) base model with LoRA/rsLoRA/DoRA adapters, trained by Lightning.

A thin module: the run's plan is decided once (:func:`lit_llama_lab.train.plan.resolve`), the model set up by the
one builder (:func:`lit_llama_lab.train.build.build`), each batch's loss computed by
:class:`lit_llama_lab.train.step.TrainStep`. Only adapter weights train and only they go into checkpoints; the frozen
base is reloaded from its source.
"""

from __future__ import annotations

import json
from typing import Literal

import lightning as L
import torch
from torchmetrics.aggregation import MeanMetric
from torchmetrics.text import Perplexity

from lit_llama_lab.data.masking import IGNORE_INDEX, labelled_next_tokens
from lit_llama_lab.model.fsdp import check_strategy, clean_name, is_fsdp
from lit_llama_lab.speed.attention import attention_inputs
from lit_llama_lab.speed.loss import label_loss
from lit_llama_lab.train.args import LoraArgs, PrecisionArgs, SpeedArgs
from lit_llama_lab.train.build import build, plan_for
from lit_llama_lab.train.ddp import is_wrapping
from lit_llama_lab.train.plan import Plan
from lit_llama_lab.train.step import TrainStep


class QLoRAModule(L.LightningModule):
    """Fine-tune a Llama-architecture model with LoRA adapters over a (by default 4-bit) frozen base.

    Args:
        name_or_path: base model: ``smollm2-135m`` (embedded), a local HF folder, a .gguf file or a hub id.
        quantize: ``nf4`` (4-bit NormalFloat, double quantization), ``fp4`` or ``none`` (plain weights).
        lora: adapter settings.
        precision: numerics (compute dtype, 4-bit storage, fp32 activations, TF32).
        speed: how the step runs (attention, compiled layers, dequantized weights, CUDA graphs, checkpointing).
        learning_rate: AdamW peak learning rate (a warmup callback may scale it).
        weight_decay: AdamW weight decay on adapter weights.
        init_adapter: an adapter folder (a checkpoint's ``last/``, an export's adapter) whose weights the new adapters
            start from, e.g. a chat adapter trained with ``configs/finetome.yaml`` before the emoji run. Its base,
            rank, alpha, rsLoRA/DoRA and target modules must be this run's (refused otherwise, naming both values).
            The replay answers (``--data.replay``) then come from base + this adapter.
        distill_weight: weight of KL(base ‖ model) on the tokens of replay chats (``--data.replay.ratio`` > 0), added
            to the cross-entropy: the base is this model with its adapters disabled, one extra forward pass without
            gradients a step (:func:`lit_llama_lab.speed.distill.distilled_label_loss`). 0 turns it off.
    """

    def __init__(
        self,
        name_or_path: str = "smollm2-135m",
        quantize: Literal["nf4", "fp4", "none"] = "nf4",
        lora: LoraArgs | None = None,
        precision: PrecisionArgs = PrecisionArgs(),  # noqa: B008 (frozen: jsonargparse expands --model.precision.*)
        speed: SpeedArgs = SpeedArgs(),  # noqa: B008 (frozen: --model.speed.*)
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        init_adapter: str | None = None,
        distill_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.lora, self.precision, self.speed = lora or LoraArgs(), precision or PrecisionArgs(), speed or SpeedArgs()
        self.save_hyperparameters(ignore=["lora", "precision", "speed"])
        for name in ("lora", "precision", "speed"):
            self.hparams[name] = vars(getattr(self, name))
        self.model = None
        self.tokenizer = None
        self.plan: Plan | None = None  # every "auto" decided, by configure_model
        self.step: TrainStep | None = None
        self.strict_loading = False  # checkpoints hold adapter weights only
        self.labelled_since_step = 0  # labelled tokens trained on since the last optimizer step (a host int)
        self.val_ppl = Perplexity(ignore_index=IGNORE_INDEX)
        self.val_loss = MeanMetric()

    @property
    def attention(self) -> str | None:
        """The attention training runs (the plan's), once the model is configured."""
        return None if self.plan is None else self.plan.attention

    @property
    def _graphed(self):
        """The step's CUDA-graphed loss (None before the first graphed step, or without graphs)."""
        return None if self.step is None else self.step.graphed

    def configure_model(self) -> None:
        """Decide the plan and build the model, once (Lightning may call this more than once). Under FSDPStrategy
        the adapter leaves and decoder layers become FSDP units here; Lightning then wraps the whole module."""
        if self.model is not None:
            return
        strategy = self.trainer.strategy if self._trainer is not None else None
        check_strategy(strategy)
        h = self.hparams
        self.plan = plan_for(h.name_or_path, h.quantize, self.precision, self.speed, self.lora,
                             device=strategy.root_device if strategy is not None else None,
                             world_size=self.trainer_world_size(), fsdp=is_fsdp(strategy),
                             wrapped=is_wrapping(strategy))
        self.model, self.tokenizer = build(h.name_or_path, h.quantize, self.lora, self.plan, h.init_adapter,
                                           training=self.training)
        self.step = TrainStep(self.model, self.plan, self.tokenizer.pad_token_id, h.distill_weight)

    def on_fit_start(self) -> None:
        """Log the plan once: to the console (rank 0) and into each logger's hyperparameters (``plan``)."""
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(f"Training plan: {self.plan.summary()}" + "".join(f"\n  {r}" for r in self.plan.reasons))
        for logger in self.loggers:
            logger.log_hyperparams({"plan": self.plan.as_dict()})
        self.cache_teacher()

    def cache_teacher(self) -> None:
        """With the KL term on and the data module's replay chats at hand, the base's states on them, once
        (``--model.speed.cache_teacher``, :class:`lit_llama_lab.speed.distill.TeacherCache`)."""
        import time

        from lightning.pytorch.utilities import rank_zero_info

        data = getattr(self.trainer, "datamodule", None)
        if not (self.hparams.distill_weight > 0 and self.speed.cache_teacher and hasattr(data, "replay_examples")):
            return
        if self.plan.fsdp:  # the base is sharded: the step's own forward pass of the base gathers it
            return
        examples = data.replay_examples()
        if not examples:
            return
        start = time.perf_counter()
        cache = self.step.cache_teacher(examples)
        rank_zero_info(f"KL targets: the base's states on {len(examples)} replay chats, computed once in "
                       f"{time.perf_counter() - start:.1f} s ({cache.nbytes / 2**20:.0f} MiB on {cache.table.device})")

    def trainer_world_size(self) -> int:
        """Processes training together (1 without a trainer)."""
        return self.trainer.world_size if self._trainer is not None else 1

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable (adapter) parameters, keyed as in this module's single-device state dict.

        Under FSDP the values are this rank's shards; :func:`lit_llama_lab.model.fsdp.gather_adapter_state_dict`
        gathers full ones.
        """
        return {clean_name(name): p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def training_loss(self, batch: dict) -> torch.Tensor:
        """Mean next-token cross-entropy over the labelled tokens of ``batch`` (:class:`TrainStep`)."""
        return self.step(batch)

    def eval_inputs(self, batch: dict) -> dict:
        """``batch`` with the attention inputs validation and test run with (the plan's validation attention)."""
        return attention_inputs(batch, self.plan.eval_attention, self.plan.compute_dtype)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.training_loss(batch)
        # ChatDataModule counts on the CPU; counting a GPU batch here would wait for the GPU
        labelled = batch.get("num_labelled") or labelled_next_tokens(batch["labels"])
        self.labelled_since_step += int(labelled)  # QLoRADDPStrategy weighs each rank's gradient by these
        self.log("train_loss", loss, batch_size=labelled)
        if self.global_step % 10 == 0:  # the progress bar reads its values every step: a GPU value would wait
            self.log("loss", loss.detach().cpu(), prog_bar=True, logger=False, batch_size=labelled)
        # a CPU tensor: a Python float would be copied to the GPU, waiting for every queued kernel
        self.log("train_tokens", torch.tensor(float(batch["input_ids"].numel())), reduce_fx="sum", batch_size=1)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, logits, targets = label_loss(self.model, self.eval_inputs(batch))
        self.val_loss.update(loss, weight=targets.numel())
        self.val_ppl.update(logits.unsqueeze(0), targets.unsqueeze(0))
        self.log("val_loss", self.val_loss, prog_bar=True, on_epoch=True, batch_size=targets.numel())
        self.log("val_ppl", self.val_ppl, on_epoch=True, batch_size=targets.numel())

    def test_step(self, batch: dict, batch_idx: int) -> None:
        loss, _, targets = label_loss(self.model, self.eval_inputs(batch))
        self.log("test_loss", loss, on_epoch=True, batch_size=targets.numel())

    def on_before_optimizer_step(self, optimizer) -> None:
        """A new optimizer step counts its labelled tokens from zero (read by QLoRADDPStrategy just before this)."""
        self.labelled_since_step = 0

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping, except under FSDP, where the norm is clipped over all shards by the strategy
        (:meth:`lit_llama_lab.model.fsdp.QLoRAFSDPStrategy.clip_gradients_by_norm`)."""
        strategy = self.trainer.strategy
        if gradient_clip_val and is_fsdp(strategy) and gradient_clip_algorithm in (None, "norm"):
            strategy.clip_gradients_by_norm(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

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
        from lit_llama_lab.train.resume import check_resume

        check_resume(self, checkpoint)  # refuses settings the saved state cannot honour; applies a new learning rate
        self.configure_model()
        missing = set(self.adapter_state_dict()) - set(checkpoint["state_dict"])
        if missing:
            raise ValueError(
                f"The checkpoint lacks {len(missing)} adapter weights of this model (e.g. {sorted(missing)[0]}): "
                "it was written for other LoRA settings (rank or target modules)."
            )
