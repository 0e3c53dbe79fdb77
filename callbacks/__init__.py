"""Training callbacks, usable from YAML as ``class_path: callbacks.<Name>``."""

from callbacks.checkpoint import AdapterCheckpoint
from callbacks.guard import DivergenceGuard
from callbacks.samples import SampleGenerations
from callbacks.throughput import TokenThroughput
from callbacks.warmup import WarmupSchedule

__all__ = ["AdapterCheckpoint", "DivergenceGuard", "SampleGenerations", "TokenThroughput", "WarmupSchedule"]
