"""Start the other ranks of a one-node multi-process fit before this process imports torch and Lightning.

Lightning's subprocess launcher starts ranks 1..N-1 when rank 0 reaches ``trainer.fit``: after rank 0's imports
(9 s on the GPU host), parsing, data setup and model load. Rank 0 then waits at the process group while rank 1 does
all of that again: on 2 H200 the emoji fit's first step came 9-10 s later than on one GPU even with the ranks
started once the CLI was parsed. Here the ``lit-llama-lab fit`` command (and ``python -m lit_llama_lab.cli fit``)
reads the device count and strategy from its arguments and ``--config`` files with a YAML reader alone, and when they
are clear (``--trainer.strategy ddp`` or ``fsdp``, or this project's strategy classes; a device count; one node) it
starts the other ranks at once, the way Lightning's launcher does: the same command line and the same environment
(``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``). Every process then finds
``LOCAL_RANK`` set, so Lightning launches nothing more, as under torchrun. Whenever the arguments are not clear (a
device count of ``auto``, an unreadable config, a cluster environment, a process that is itself a launched rank),
nothing starts here and Lightning's launcher does its usual work.

Only the standard library and PyYAML are imported here.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

FSDP_STRATEGY = "lit_llama_lab.model.fsdp.QLoRAFSDPStrategy"
DDP_STRATEGY = "lit_llama_lab.train.ddp.QLoRADDPStrategy"
STRATEGIES = {"fsdp": FSDP_STRATEGY, "ddp": DDP_STRATEGY}  # names the CLI maps to this project's strategies
EARLY_STRATEGIES = {*STRATEGIES, *STRATEGIES.values()}  # the strategies whose ranks start here: names and classes
# a process launched by someone else (Lightning, torchrun, SLURM, LSF, MPI): it starts no ranks
EXTERNAL_ENV = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "LSB_JOBID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
TRAINER_KEYS = ("devices", "strategy", "num_nodes")
STARTED: list[subprocess.Popen] = []  # the ranks this process started


def launched_devices(devices: Any) -> int:
    """How many processes ``--trainer.devices`` asks for on one node when that is clear from the value alone (an
    int, a count as a string, a list or a comma list of device ids); 0 for ``auto``, ``-1`` and anything else."""
    if isinstance(devices, str):
        text = devices.strip()
        if text.isdigit():
            return int(text)
        ids = [part for part in text.split(",") if part.strip()]
        return len(ids) if len(ids) > 1 and all(part.strip().isdigit() for part in ids) else 0
    if isinstance(devices, (list, tuple)):
        return len(devices)
    return devices if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0 else 0


def trainer_options(args: list[str]) -> dict[str, Any] | None:
    """``trainer.devices``, ``.strategy``, ``.num_nodes`` and ``seed_everything`` as a ``fit`` command line sets them
    (``--config`` files and options, later ones winning, as jsonargparse reads them); None when a config cannot be
    read."""
    import yaml

    found: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-"):
            i += 1
            continue
        if "=" in arg:
            (key, value), i = arg.lstrip("-").split("=", 1), i + 1
        else:
            takes_value = i + 1 < len(args) and not args[i + 1].startswith("--")
            key, value, i = arg.lstrip("-"), args[i + 1] if takes_value else None, i + (2 if takes_value else 1)
        if key in ("config", "c"):
            if value is None:
                return None
            try:
                loaded = yaml.safe_load(Path(value).read_text())
            except (OSError, yaml.YAMLError):
                return None
            loaded = loaded if isinstance(loaded, dict) else {}
            trainer = loaded.get("trainer")
            if isinstance(trainer, dict):
                found.update({k: trainer[k] for k in TRAINER_KEYS if k in trainer})
            if "seed_everything" in loaded:
                found["seed_everything"] = loaded["seed_everything"]
        elif key in {f"trainer.{k}" for k in TRAINER_KEYS} or key == "seed_everything":
            try:
                found[key.removeprefix("trainer.")] = yaml.safe_load(value) if value is not None else True
            except yaml.YAMLError:
                return None
        elif key == "trainer":  # a whole trainer config in one option
            return None
    return found


def early_rank_count(args: list[str]) -> tuple[int, Any]:
    """How many processes to start for ``args`` (the command line after the program), 0 when not this module's to
    start: not ``fit``, help or print-config, a launched or cluster process, or the options not clear; and the
    run's ``seed_everything`` (LightningCLI's default: True)."""
    if not args or args[0] != "fit" or any(a in ("-h", "--help") or a.startswith("--print_config") for a in args):
        return 0, None
    if any(name in os.environ for name in EXTERNAL_ENV):
        return 0, None
    options = trainer_options(args[1:])
    if options is None:
        return 0, None
    strategy = options.get("strategy")
    name = strategy.get("class_path") if isinstance(strategy, dict) else strategy
    if name not in EARLY_STRATEGIES or (options.get("num_nodes") or 1) != 1:
        return 0, None
    count = launched_devices(options.get("devices", 1))
    return (count if count > 1 else 0), options.get("seed_everything", True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _command() -> list[str]:
    """This program's command line, as Lightning's launcher re-runs it (``-m module`` or the script's path)."""
    import __main__

    spec = getattr(__main__, "__spec__", None)
    if spec is None:
        return [sys.executable, os.path.abspath(sys.argv[0]), *sys.argv[1:]]
    return [sys.executable, "-m", spec.name, *sys.argv[1:]]


def start_ranks_early(args: list[str] | None = None) -> list[subprocess.Popen]:
    """Start ranks 1..N-1 now when :func:`early_rank_count` says so (``args``: this program's arguments, by default
    ``sys.argv[1:]``); set this process up as rank 0. Returns the started processes (also kept in :data:`STARTED`)."""
    count, seed = early_rank_count(sys.argv[1:] if args is None else args)
    if count == 0:
        return []
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ["NODE_RANK"] = "0"
    os.environ["LOCAL_RANK"] = "0"
    os.environ["WORLD_SIZE"] = str(count)
    if seed is True or seed is None:  # a seed drawn at random: the same on every rank, as Lightning's launcher passes it
        os.environ.setdefault("PL_GLOBAL_SEED", str(random.randint(0, 2**31 - 1)))
    command = _command()
    for rank in range(1, count):
        STARTED.append(subprocess.Popen(command, env={**os.environ, "LOCAL_RANK": str(rank)}))
    print(f"Started ranks 1-{count - 1} of {count} before loading torch and Lightning "
          f"(pids {' '.join(str(p.pid) for p in STARTED)}).", file=sys.stderr, flush=True)
    return STARTED


def watch_started_ranks() -> None:
    """Lightning's watcher over the started ranks: when one fails, every process is stopped (what Lightning's launcher
    runs over the ranks it starts)."""
    if STARTED:
        from lightning.fabric.strategies.launchers.subprocess_script import _launch_process_observer

        _launch_process_observer(STARTED)


def stop_started_ranks() -> None:
    """Stop the started ranks (rank 0 failed before they could meet it at the process group, where they would wait
    until its timeout)."""
    for proc in STARTED:
        if proc.poll() is None:
            proc.kill()

