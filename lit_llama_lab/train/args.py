"""Training settings in groups: ``--model.lora.*``, ``--model.precision.*`` and ``--model.speed.*``. Each group's
docstring is its ``--help``; ``auto`` values are decided once, by :func:`lit_llama_lab.train.plan.resolve`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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
        """The peft ``LoraConfig`` of these settings (a causal LM)."""
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


@dataclass(frozen=True)
class PrecisionArgs:
    """Numerics of the frozen base and the adapters.

    Args:
        compute_dtype: ``auto`` (bf16 on a GPU, fp32 on a CPU), ``bfloat16``, ``float16`` or ``float32``.
        quant_storage: dtype the packed 4-bit weights are stored in: ``auto`` (uint8, or the compute dtype under
            ``--trainer.strategy fsdp``, which can only shard floating tensors of one dtype), ``uint8``, ``bfloat16``,
            ``float16`` or ``float32``. Outputs are the same in every storage dtype.
        fp32_activations: keep the hidden states between matmuls (residual stream, norms, MLP activations, each
            adapter's sum with its frozen projection) in fp32 while matmuls and attention run in the bf16/fp16 compute
            dtype (no effect in fp32): the plain stack's numerics without its fp32 weights
            (:func:`lit_llama_lab.model.precision.keep_fp32_activations`). ``auto``: on, except on a GPU for models
            of hidden size >= 1024, whose adapters multiply in the compute dtype (``adapter_matmuls auto``): there the
            bench's held-out loss is the same either way (+0.09% against +0.07% of the plain stack's) and fp32 costs
            0.56 GiB of the 1B step's 3.89 (docs/speed.md). ``true`` / ``false`` force it.
        tf32: on a CUDA GPU, run fp32 matmuls on TF32 tensor cores (``torch.set_float32_matmul_precision("high")``,
            a process-wide setting): with fp32 activations these are the adapters' matmuls, which otherwise run on
            plain fp32 cores. Inputs keep 10 mantissa bits and sums stay fp32: finer than the bf16 the plain stack
            computes them in under autocast. The 4-bit base matmuls run in the compute dtype either way.
        adapter_matmuls: the dtype the LoRA matrices multiply in; they stay fp32 for the optimizer either way.
            ``compute``: inputs and weights cast to the compute dtype, as bf16 autocast runs them in the plain stack;
            with fp32 activations each adapter's sum with its frozen projection is still fp32. ``float32``: fp32
            (TF32 with ``tf32``). ``auto``: ``compute`` on a GPU for models of hidden size >= 1024, where these thin
            fp32 matmuls cost about a tenth of the 1B step; else ``float32`` (small models are bound by kernel
            launches, not by these matmuls).
    """

    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = "auto"
    fp32_activations: bool | Literal["auto"] = "auto"
    tf32: bool = True
    adapter_matmuls: Literal["auto", "compute", "float32"] = "auto"


@dataclass(frozen=True)
class SpeedArgs:
    """How the training step runs: each technique computes the plain step's math (``tests/speed``).

    Args:
        attention: ``auto`` (``varlen`` when the model is on a CUDA GPU that FlashAttention supports, Ampere or
            newer, with a bf16/fp16 compute dtype and torch has ``torch.nn.attention.varlen``; else ``sdpa``),
            ``varlen`` (refused where it cannot run), ``sdpa``, ``eager`` or ``flex_attention``. ``varlen`` trains
            packed batches through FlashAttention varlen from per-document offsets of a fixed size, so no
            ``[rows, 1, width, width]`` mask reaches the step and CUDA graphs can replay it; validation (our 4-D mask)
            and generation run through sdpa.
        compile: ``torch.compile`` each decoder layer (with gradient checkpointing the compiled layer is recomputed
            whole in backward: :func:`lit_llama_lab.speed.compile.checkpoint_kwargs`). ``auto``: on when training on
            one CUDA GPU a model of hidden size >= 1024 (Llama-3.2-1B and up), where the step's arithmetic is worth
            fusing and tens of seconds of compilation pay for themselves; off for small models such as SmolLM2-135M,
            on CPUs, under FSDP and inside Lightning's DDP wrapper (``--trainer.strategy ddp``, this project's
            :class:`~lit_llama_lab.train.ddp.QLoRADDPStrategy`, keeps it). ``true`` / ``false`` force it (``true`` is
            refused under FSDP).
        dequantize_once: keep each frozen 4-bit layer's weight dequantized (in the compute dtype) for the whole run
            instead of dequantizing it at every forward and backward
            (:func:`lit_llama_lab.speed.dequantize.cache_dequantized_weights`): the same values, a few kernels fewer
            per projection, at the cost of the weights' 16-bit size in memory. ``auto``: on when training on CUDA and
            that copy takes at most 1 GiB (SmolLM2-135M: 0.2 GB; off for Llama-3.2-1B, whose 4-bit memory is the
            point), off on CPUs and under FSDP. ``true`` / ``false`` force it (``true`` is refused under FSDP).
        cuda_graphs: on one CUDA GPU, replay each training step's forward and backward from a CUDA graph (one per
            batch shape; same kernels, same math): removes the per-kernel launch overhead that dominates small
            models. Each rank of ``--trainer.strategy ddp`` keeps them (the gradients are averaged outside the graph);
            off under FSDP, inside Lightning's DDP wrapper, and with gradient checkpointing plus LoRA dropout.
        graph_pad_multiple: with CUDA graphs, packed rows are padded to a multiple of this many tokens so batches
            fall into few shapes (each shape is one capture and its own activation memory).
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        mlp_chunks: run each decoder layer's MLP in this many row blocks
            (:func:`lit_llama_lab.speed.memory.chunk_mlp`; the same values). With compiled, checkpointed layers the
            backward then recomputes and frees one block's MLP activations at a time. ``auto``: 6 for compiled layers
            with gradient checkpointing, else 1 (an eager checkpoint recomputes the whole layer at once, so blocks
            would save nothing); with ``auto`` only micro-batches of at least 8,192 tokens run in blocks
            (:data:`lit_llama_lab.speed.memory.MIN_TOKENS`): smaller ones need no such saving and run faster whole.
            A number asked for by name, or ``offload_checkpoints true``, applies the blocks to every batch.
        offload_checkpoints: keep the inputs that compiled, checkpointed layers save for backward in pinned host
            memory, copied on a side stream that overlaps the compute
            (:class:`lit_llama_lab.speed.memory.CheckpointOffload`; CUDA graphs capture it). ``auto``: on for
            compiled layers with gradient checkpointing on a CUDA GPU, for micro-batches of at least 8,192 tokens
            (as the blocks). ``true`` needs those three and applies it, and the blocks, to every batch.
        liger: Liger-Kernel's fused RMSNorm, RoPE and SwiGLU (needs ``liger-kernel`` and a CUDA GPU).
        cache_teacher: with ``--model.distill_weight`` > 0, run the frozen base over the replay chats once at the
            start of training and keep its final hidden states (:class:`lit_llama_lab.speed.distill.TeacherCache`),
            instead of a forward pass of the base in every step: the same KL targets (the base and the replay chats
            never change), one forward pass fewer per step. Costs the replay tokens x hidden size in the compute
            dtype on the device (SmolLM2-135M, the bundled pool: about 0.1 GB).
    """

    attention: Literal["auto", "varlen", "sdpa", "eager", "flex_attention"] = "auto"
    compile: bool | Literal["auto"] = "auto"
    dequantize_once: bool | Literal["auto"] = "auto"
    cuda_graphs: bool = True
    graph_pad_multiple: int = 128
    gradient_checkpointing: bool = False
    mlp_chunks: int | Literal["auto"] = "auto"
    offload_checkpoints: bool | Literal["auto"] = "auto"
    liger: bool = False
    cache_teacher: bool = True
