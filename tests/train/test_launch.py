"""Which ``fit`` command lines start their other ranks before the imports (:mod:`lit_llama_lab.launch`). The
2-process CLI runs of ``tests/e2e/test_ddp.py`` check that the ranks do start there and train what one process
trains."""

from pathlib import Path

import pytest

from lit_llama_lab.launch import early_rank_count, launched_devices, trainer_options

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_cluster(monkeypatch):
    for name in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "LSB_JOBID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(name, raising=False)


def test_device_counts_that_are_clear_from_the_value_alone():
    assert [launched_devices(d) for d in (2, "2", [0, 1], "0,1", "1,", "auto", -1, 1, None, True)] == \
        [2, 2, 2, 2, 0, 0, 0, 1, 0, 0]


def test_the_options_are_read_as_jsonargparse_reads_them_later_ones_winning(tmp_path):
    config = tmp_path / "two.yaml"
    config.write_text("seed_everything: 7\ntrainer:\n  devices: 2\n  strategy: ddp\n")
    assert trainer_options(["--config", str(config)]) == {"devices": 2, "strategy": "ddp", "seed_everything": 7}
    # an option after the file overrides it; a file after an option overrides the option; bare flags take no value
    assert trainer_options([f"--config={config}", "--trainer.devices", "1"])["devices"] == 1
    assert trainer_options(["--trainer.devices", "4", "--config", str(config)])["devices"] == 2
    assert trainer_options(["--trainer.fast_dev_run", "--trainer.devices=3"])["devices"] == 3
    assert trainer_options(["--config", str(tmp_path / "missing.yaml")]) is None


def test_ddp_and_fsdp_fits_on_a_known_device_count_start_early_and_nothing_else(tmp_path, monkeypatch):
    emoji = str(ROOT / "configs" / "emoji.yaml")  # devices: 1 in the file
    two = ["--trainer.devices", "2"]
    assert early_rank_count(["fit", "--config", emoji, *two, "--trainer.strategy", "ddp"]) == (2, 42)
    assert early_rank_count(["fit", "--config", emoji, *two, "--trainer.strategy", "fsdp"])[0] == 2
    assert early_rank_count(["fit", "--config", emoji, "--trainer.devices", "0,1",
                             "--trainer.strategy", "lit_llama_lab.train.ddp.QLoRADDPStrategy"])[0] == 2
    refused = [
        ["fit", "--config", emoji, "--trainer.strategy", "ddp"],  # one device (the file's)
        ["fit", "--config", emoji, "--trainer.devices", "auto", "--trainer.strategy", "ddp"],  # Lightning decides
        ["fit", "--config", emoji, *two, "--trainer.strategy", "ddp_spawn"],  # another strategy: Lightning's launcher
        ["fit", "--config", emoji, *two],  # no strategy given
        ["fit", "--config", emoji, *two, "--trainer.strategy", "ddp", "--trainer.num_nodes", "2"],
        ["fit", "--config", emoji, *two, "--trainer.strategy", "ddp", "--print_config"],
        ["validate", "--config", emoji, *two, "--trainer.strategy", "ddp"],
        ["fit", "--trainer", "trainer.yaml", *two, "--trainer.strategy", "ddp"],  # a whole trainer file: not read here
    ]
    for args in refused:
        assert early_rank_count(args)[0] == 0, args
    monkeypatch.setenv("LOCAL_RANK", "1")  # a launched rank (Lightning's, torchrun's) starts nothing
    assert early_rank_count(["fit", "--config", emoji, *two, "--trainer.strategy", "ddp"])[0] == 0
