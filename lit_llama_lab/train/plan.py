"""One decision of every ``auto``: the settings (:mod:`lit_llama_lab.train.args`) and where the run trains
(:class:`Target`) go in, a frozen :class:`Plan` comes out. Nothing downstream decides again: the setup
(:mod:`lit_llama_lab.train.build`), the step (:mod:`lit_llama_lab.train.step`), validation and the bench read the
plan. It is logged once at fit start, to the console and to the loggers' hyperparameters (``plan``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch

from lit_llama_lab.model.precision import dtype_name, resolve_compute_dtype, resolve_quant_storage
from lit_llama_lab.speed.attention import loading_attention, varlen_unsupported
from lit_llama_lab.speed.memory import MIN_TOKENS
from lit_llama_lab.train.args import PrecisionArgs, SpeedArgs

log = logging.getLogger(__name__)
COMPILE_MIN_HIDDEN = 1024  # compile auto: models at least this wide (Llama-3.2-1B and up)
DEQUANTIZED_MAX_BYTES = 2**30  # dequantize_once auto: when the 16-bit copy of the 4-bit weights fits in this
# mlp_chunks auto for compiled, checkpointed layers: at the 1B shape on an H200 (with offloaded checkpoints) 4 blocks
# peaked at 2.013 GiB and 58.0k tokens/s, 8 at 1.849 GiB and 55.7k, whole MLPs at 3.33 GiB and 60.4k (docs/speed.md)
MLP_CHUNKS = 6


@dataclass(frozen=True)
class Target:
    """Where a run trains and the facts of its model the plan depends on, known before any weight loads.

    Args:
        device: the device the model trains on.
        world_size: processes training together.
        fsdp: sharded by :class:`lit_llama_lab.model.fsdp.QLoRAFSDPStrategy`.
        wrapped: the module runs inside a wrapper that syncs in its backward hooks (torch's
            ``DistributedDataParallel``, FSDP): CUDA graphs and compiled layers are off. Ranks of
            :class:`lit_llama_lab.train.ddp.QLoRADDPStrategy` run unwrapped, as one process does.
        hidden_size: the model's hidden size.
        four_bit_params: weights its 4-bit layers hold (0 when it is not quantized).
    """

    device: torch.device
    world_size: int = 1
    fsdp: bool = False
    hidden_size: int = 0
    four_bit_params: int = 0
    wrapped: bool = False

    @property
    def unwrapped(self) -> bool:
        """Each process runs the module as one process would (one process, or QLoRADDPStrategy's ranks)."""
        return self.world_size == 1 or not (self.fsdp or self.wrapped)


def target_for(name_or_path: str, quantize: str, device: str | torch.device | None = None, world_size: int = 1,
               fsdp: bool = False, wrapped: bool = False) -> Target:
    """The :class:`Target` of base model ``name_or_path`` (its config read, no weights loaded) on ``device``
    (default: a GPU when there is one)."""
    from lit_llama_lab.model.load import model_config
    from lit_llama_lab.speed.dequantize import four_bit_params

    config = model_config(name_or_path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return Target(device, world_size, fsdp, config.hidden_size, 0 if quantize == "none" else four_bit_params(config),
                  wrapped)


@dataclass(frozen=True)
class Plan:
    """What a run does, every ``auto`` decided (:func:`resolve`); ``reasons`` says why for each ``auto``.

    ``autocast`` is always ``none``: training runs no autocast (bf16 matmuls come from the bf16 weights, fp32
    activations and TF32 from :class:`~lit_llama_lab.train.args.PrecisionArgs`).
    """

    device: str
    compute_dtype: torch.dtype
    quant_storage: torch.dtype
    fp32_activations: bool
    tf32: bool
    attention: str
    compile: bool
    dequantize_once: bool
    cuda_graphs: bool
    graph_pad_multiple: int
    gradient_checkpointing: bool
    mlp_chunks: int = 1
    offload_checkpoints: bool = False
    memory_min_tokens: int = MIN_TOKENS  # the blocks and the offload apply from this many tokens a micro-batch
    liger: bool = False
    fsdp: bool = False
    adapter_matmul_dtype: torch.dtype = torch.float32
    autocast: str = "none"
    reasons: tuple[str, ...] = ()

    @property
    def eval_attention(self) -> str:
        """The attention validation and test batches are converted for: varlen's model validates through sdpa."""
        return "sdpa" if self.attention == "varlen" else self.attention

    @property
    def load_attention(self) -> str:
        """The ``attn_implementation`` the base is loaded with (:func:`lit_llama_lab.speed.attention.use_attention`
        switches it to varlen after)."""
        return loading_attention(self.attention)

    def as_dict(self) -> dict:
        """The plan as plain JSON values (dtypes by name), for logs and bench results."""
        values = asdict(self)
        values.update(compute_dtype=dtype_name(self.compute_dtype), quant_storage=dtype_name(self.quant_storage),
                      adapter_matmul_dtype=dtype_name(self.adapter_matmul_dtype), reasons=list(self.reasons))
        return values

    def summary(self) -> str:
        """One line: what the step runs."""
        parts = [f"{dtype_name(self.compute_dtype)} compute", f"autocast {self.autocast}",
                 "fp32 activations" if self.fp32_activations else "activations in the compute dtype",
                 "TF32" if self.tf32 else "no TF32", f"adapter matmuls in {dtype_name(self.adapter_matmul_dtype)}",
                 f"{self.attention} attention",
                 "compiled layers" if self.compile else "eager layers",
                 "dequantized once" if self.dequantize_once else "dequantized at every use",
                 f"CUDA graphs (rows padded to {self.graph_pad_multiple})" if self.cuda_graphs else "no CUDA graphs",
                 "checkpointing" if self.gradient_checkpointing else "no checkpointing"]
        large = f" (micro-batches of {self.memory_min_tokens:,}+ tokens)" if self.memory_min_tokens else ""
        parts += [f"MLP in {self.mlp_chunks} row blocks{large}"] * (self.mlp_chunks > 1)
        parts += [f"checkpoints in host memory{large}"] * self.offload_checkpoints
        return ", ".join(parts + ["Liger"] * self.liger + ["FSDP"] * self.fsdp)


def _switch(name: str, setting, fsdp: bool, fsdp_reason: str) -> bool | None:
    """A ``true | false | auto`` setting: its bool, or None for ``auto``; bad values and ``true`` under FSDP
    (for ``fsdp_reason``) are refused."""
    if setting not in (True, False, "auto"):
        raise ValueError(f"{name}={setting!r}: use true, false or auto.")
    if setting is True and fsdp:
        raise ValueError(f"{name}=true is not supported under FSDP ({fsdp_reason}); use --model.speed.{name} false.")
    return None if setting == "auto" else setting


def resolve_attention(setting: str, target: Target, compute: torch.dtype, reasons: list[str]) -> str:
    """``auto`` and ``varlen``: varlen where FlashAttention can run, else sdpa (``auto``) or an error (``varlen``)."""
    if setting not in ("auto", "varlen"):
        return setting
    reason = varlen_unsupported(target.device, compute)
    if reason is None:
        return "varlen"
    if setting == "varlen":
        raise ValueError(f"attention=varlen cannot run here: {reason}. Use --model.speed.attention auto or sdpa.")
    reasons.append(f"attention sdpa with the packed-batch mask: FlashAttention varlen is off ({reason})")
    return "sdpa"


def resolve_compile(setting, target: Target, reasons: list[str]) -> bool:
    """``auto``: on for a CUDA process running the module unwrapped (:attr:`Target.unwrapped`) training a model at
    least :data:`COMPILE_MIN_HIDDEN` wide."""
    forced = _switch("compile", setting, target.fsdp, "compiled layers inside FSDP units")
    if forced is not None:
        return forced
    on = target.device.type == "cuda" and target.unwrapped and target.hidden_size >= COMPILE_MIN_HIDDEN
    reasons.append(f"compile {'on' if on else 'off'}: {target.device.type}, {target.world_size} process(es)"
                   f"{'' if target.unwrapped else ' inside a DDP/FSDP wrapper'}, hidden size {target.hidden_size} "
                   f"(on from {COMPILE_MIN_HIDDEN} on a GPU, one process or --trainer.strategy ddp)")
    return on


def resolve_dequantize_once(setting, target: Target, compute: torch.dtype, reasons: list[str]) -> bool:
    """``auto``: on for CUDA without FSDP when the 4-bit weights' copy in ``compute`` fits
    :data:`DEQUANTIZED_MAX_BYTES`."""
    forced = _switch("dequantize_once", setting, target.fsdp, "each rank would hold every full weight")
    if forced is not None:
        return forced
    size = target.four_bit_params * compute.itemsize
    on = target.device.type == "cuda" and not target.fsdp and 0 < size <= DEQUANTIZED_MAX_BYTES
    reasons.append(f"dequantize_once {'on' if on else 'off'}: {target.device.type}, a {size / 2**30:.2f} GiB copy "
                   f"(on up to {DEQUANTIZED_MAX_BYTES / 2**30:.0f} GiB on a GPU, without FSDP)")
    return on


def wide_on_gpu(compute: torch.dtype, target: Target) -> bool:
    """A model at least :data:`COMPILE_MIN_HIDDEN` wide computing in 16 bits on a GPU: its step is bound by
    arithmetic and bandwidth, so its activations and adapter matmuls run in the compute dtype by default."""
    return target.device.type == "cuda" and compute != torch.float32 and target.hidden_size >= COMPILE_MIN_HIDDEN


def resolve_fp32_activations(setting, compute: torch.dtype, target: Target, reasons: list[str]) -> bool:
    """``auto``: on, except for :func:`wide_on_gpu` models (their held-out loss is the same without, and the fp32
    stream costs the 1B step 0.56 GiB). Never in fp32 compute, where there is nothing to keep."""
    forced = _switch("fp32_activations", setting, False, "")
    if compute == torch.float32:
        return False
    if forced is not None:
        return forced
    on = not wide_on_gpu(compute, target)
    reasons.append(f"fp32_activations {'on' if on else 'off'}: {target.device.type}, hidden size {target.hidden_size} "
                   f"(off from {COMPILE_MIN_HIDDEN} on a GPU)")
    return on


def resolve_adapter_matmuls(setting: str, compute: torch.dtype, target: Target, reasons: list[str]) -> torch.dtype:
    """The dtype the LoRA matrices multiply in. ``auto``: the compute dtype for :func:`wide_on_gpu` models, else
    fp32 (the adapters' own dtype)."""
    if setting not in ("auto", "compute", "float32"):
        raise ValueError(f"--model.precision.adapter_matmuls {setting!r}: use auto, compute or float32.")
    if setting != "auto":
        return compute if setting == "compute" else torch.float32
    on = wide_on_gpu(compute, target)
    reasons.append(f"adapter_matmuls {dtype_name(compute) if on else 'float32'}: {target.device.type}, hidden size "
                   f"{target.hidden_size} (the compute dtype from {COMPILE_MIN_HIDDEN} on a GPU)")
    return compute if on else torch.float32


def resolve_cuda_graphs(speed: SpeedArgs, lora_dropout: float, target: Target, reasons: list[str]) -> bool:
    """CUDA graphs run on CUDA processes that run the module unwrapped (one process, or the ranks of
    :class:`lit_llama_lab.train.ddp.QLoRADDPStrategy`, which all-reduce outside the graph; a wrapper's backward
    hooks cannot be captured), and not with gradient checkpointing plus LoRA dropout (checkpointing saves the RNG
    state to replay dropout, which a capture cannot do)."""
    if not speed.cuda_graphs:
        return False
    if target.device.type != "cuda":
        return False
    if not target.unwrapped:
        reasons.append("cuda_graphs off: the module runs inside a DDP/FSDP wrapper (--trainer.strategy ddp keeps them)")
        return False
    if speed.gradient_checkpointing and lora_dropout > 0:
        log.warning("cuda_graphs is off: gradient checkpointing with LoRA dropout > 0 cannot be captured.")
        reasons.append("cuda_graphs off: gradient checkpointing with LoRA dropout > 0 cannot be captured")
        return False
    return True


def resolve_mlp_chunks(setting, compiled: bool, checkpointing: bool, reasons: list[str]) -> int:
    """``auto``: :data:`MLP_CHUNKS` row blocks for compiled layers with checkpointing, whose backward recomputes one
    block at a time; else 1."""
    if setting == "auto":
        chunks = MLP_CHUNKS if compiled and checkpointing else 1
        reasons.append(f"mlp_chunks {chunks}: {'compiled' if compiled else 'eager'} layers, "
                       f"{'' if checkpointing else 'no '}checkpointing ({MLP_CHUNKS} for compiled, checkpointed layers)")
        return chunks
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise ValueError(f"mlp_chunks={setting!r}: use auto, 1 (whole MLPs) or more row blocks.")
    return setting


def resolve_offload(setting, compiled: bool, checkpointing: bool, target: Target, reasons: list[str]) -> bool:
    """``auto``: on for compiled layers with checkpointing on a CUDA GPU, the only layers whose saved inputs a hook
    can move (an eager checkpoint keeps its input by reference); ``true`` is refused elsewhere."""
    forced = _switch("offload_checkpoints", setting, target.fsdp, "FSDP shards and gathers the layers itself")
    possible = compiled and checkpointing and target.device.type == "cuda"
    if forced is not None:
        if forced and not possible:
            raise ValueError("offload_checkpoints=true needs compiled layers (--model.speed.compile) with "
                             "--model.speed.gradient_checkpointing true on a CUDA GPU; use "
                             "--model.speed.offload_checkpoints auto or false.")
        return forced
    reasons.append(f"offload_checkpoints {'on' if possible else 'off'}: {target.device.type}, "
                   f"{'compiled' if compiled else 'eager'} layers, {'' if checkpointing else 'no '}checkpointing "
                   "(on for compiled, checkpointed layers on a GPU)")
    return possible


def resolve(precision: PrecisionArgs, speed: SpeedArgs, lora_dropout: float, target: Target) -> Plan:
    """Decide every ``auto`` of ``precision`` and ``speed`` for ``target``, once; refuse what cannot run there,
    naming the setting to change."""
    reasons: list[str] = []
    compute = resolve_compute_dtype(precision.compute_dtype, target.device)
    on_cuda = target.device.type == "cuda"
    fp32_activations = resolve_fp32_activations(precision.fp32_activations, compute, target, reasons)
    compiled = resolve_compile(speed.compile, target, reasons)
    checkpointing = speed.gradient_checkpointing
    return Plan(
        device=str(target.device),
        compute_dtype=compute,
        quant_storage=resolve_quant_storage(precision.quant_storage, compute, sharded=target.fsdp),
        fp32_activations=fp32_activations,
        tf32=precision.tf32 and on_cuda,
        attention=resolve_attention(speed.attention, target, compute, reasons),
        compile=compiled,
        dequantize_once=resolve_dequantize_once(speed.dequantize_once, target, compute, reasons),
        cuda_graphs=resolve_cuda_graphs(speed, lora_dropout, target, reasons),
        graph_pad_multiple=speed.graph_pad_multiple,
        gradient_checkpointing=checkpointing,
        mlp_chunks=resolve_mlp_chunks(speed.mlp_chunks, compiled, checkpointing, reasons),
        offload_checkpoints=resolve_offload(speed.offload_checkpoints, compiled, checkpointing, target, reasons),
        # ``auto`` saves memory where a batch needs it (MIN_TOKENS); either setting asked for by name puts both (one
        # threshold) on every batch
        memory_min_tokens=0 if speed.mlp_chunks != "auto" or speed.offload_checkpoints is True else MIN_TOKENS,
        liger=speed.liger,
        fsdp=target.fsdp,
        adapter_matmul_dtype=resolve_adapter_matmuls(precision.adapter_matmuls, compute, target, reasons),
        reasons=tuple(reasons),
    )
