"""The speed path: one technique per module, each proven equal to the plain path by a test under ``tests/speed``.

:mod:`.loss` (chunked fixed-shape cross-entropy), :mod:`.distill` (KL to the frozen base), :mod:`.attention` (the
one batch → attention conversion, FlashAttention varlen), :mod:`.compile` (compiled layers, their checkpoint policy,
Liger), :mod:`.dequantize` (4-bit weights dequantized once), :mod:`.graphs` (CUDA-graph replay of the step). Which
of them a run uses is decided once, in :func:`lit_llama_lab.train.plan.resolve`.
"""
