import glob
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_llama_lab.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_every_config_parses(tmp_path, capsys):
    for config in sorted((ROOT / "configs").glob("*.yaml")):
        with pytest.raises(SystemExit) as done:
            main(["fit", "--config", str(config), "--print_config"])
        assert done.value.code in (0, None), config
        printed = capsys.readouterr().out
        assert "name_or_path" in printed and "batch_size" in printed, config


def test_override_on_command_line(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "configs/emoji.yaml"), "--model.lora.r", "16", "--print_config"])
    printed = capsys.readouterr().out
    assert "r: 16" in printed


def test_unknown_config_key_is_refused(capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(ROOT / "configs/debug.yaml"), "--model.lora.rank", "8"])
    assert done.value.code != 0
    err = capsys.readouterr().err
    assert "rank" in err and "not accepted" in err


def test_debug_fit_writes_logs_and_adapter_checkpoint(tmp_path):
    """The console script end to end: tiny model, real data pipeline, TensorBoard logs, adapter-only checkpoint."""
    cmd = [sys.executable, "-m", "lit_llama_lab.cli", "fit", "--config", str(ROOT / "configs/debug.yaml"),
           "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.default_root_dir", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert glob.glob(f"{tmp_path}/debug/version_*/events.out.tfevents.*")
    ckpts = glob.glob(f"{tmp_path}/**/*.ckpt", recursive=True)
    assert ckpts, "no checkpoint written"
    state = torch.load(sorted(ckpts)[-1], map_location="cpu", weights_only=True)["state_dict"]
    assert state and all("lora_" in k for k in state)
