"""Compiled decoder layers (``torch.compile`` per layer), the checkpoint policy they need, and Liger-Kernel's fused
RMSNorm/RoPE/SwiGLU. ``tests/speed/test_compile.py`` checks compiled training against eager."""

from __future__ import annotations

from functools import partial

from lit_llama_lab.model.adapters import unwrap_peft


def apply_liger(model) -> None:
    """Liger-Kernel's fused RMSNorm, RoPE and SwiGLU on a Llama model (before adapters are attached).

    Optional: needs ``liger-kernel`` and triton (a CUDA GPU). The loss stays ours (:mod:`lit_llama_lab.speed.loss`).
    """
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except ImportError as error:
        raise ValueError(f"liger=True needs liger-kernel on a CUDA GPU: pip install liger-kernel==0.8.5 ({error}).") from None
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=model)


def _recompute_everything(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_RECOMPUTE


def checkpoint_kwargs(compiled: bool = False, preserve_rng_state: bool = True) -> dict:
    """``gradient_checkpointing_kwargs`` for our training: non-reentrant checkpointing; under ``torch.compile``
    a selective-checkpoint policy that marks every op must-recompute.

    Without that policy torch.compile (2.11) keeps what it considers costly to recompute in a checkpointed layer,
    bitsandbytes' 4-bit matmul outputs (a custom op) among them, for every layer until the backward pass: measured
    at the 1B shape (micro-batch 4 x 2048), 7.5 GiB held after the forward instead of 2.3, an 8.8 GiB peak instead
    of 3.9. With the policy the compiled layer is recomputed whole, as the eager checkpoint does (``make bench``).
    In eager mode the policy would only add a dispatch hook to every op, so it is set for compiled layers only.
    """
    kwargs = {"use_reentrant": False, "preserve_rng_state": preserve_rng_state}
    if compiled:
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _recompute_everything)
    return kwargs


def compile_decoder_layers(model) -> int:
    """``torch.compile`` each decoder layer in place (its checkpoint, if any, inside the compiled region: set it
    up with :func:`checkpoint_kwargs` ``(compiled=True)`` so the compiled layer is recomputed in backward).

    Returns the number of layers compiled. The compiled loss must be checked against eager: see the benchmark.
    """
    causal_lm = unwrap_peft(model)
    layers = causal_lm.get_decoder().layers
    for layer in layers:
        layer.compile()
    return len(layers)
