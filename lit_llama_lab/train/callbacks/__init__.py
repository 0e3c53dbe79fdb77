"""Training callbacks, usable from YAML as ``class_path: lit_llama_lab.train.callbacks.<Name>``."""

from lit_llama_lab.train.callbacks.checkpoint import AdapterCheckpoint
from lit_llama_lab.train.callbacks.guard import DivergenceGuard
from lit_llama_lab.train.callbacks.samples import SampleGenerations
from lit_llama_lab.train.callbacks.throughput import TokenThroughput
from lit_llama_lab.train.callbacks.warmup import WarmupSchedule

__all__ = ["AdapterCheckpoint", "DivergenceGuard", "SampleGenerations", "TokenThroughput", "WarmupSchedule"]
