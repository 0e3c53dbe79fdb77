"""A run that starts from an existing adapter (``--model.init_adapter``): weights carried over, wrong ones refused."""

import json

import pytest
import torch

from lit_llama_lab.model.adapters import ADAPTER_METADATA, write_peft_files
from lit_llama_lab.train.args import LoraArgs
from lit_llama_lab.train.module import QLoRAModule

LORA = {"r": 8, "alpha": 16, "use_rslora": True}


def trained_adapter(folder, base="tiny-random"):
    """An adapter folder as checkpoints write it, with weights no fresh init would give."""
    module = QLoRAModule(name_or_path="tiny-random", lora=LoraArgs(**LORA))
    module.configure_model()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.model.parameters():
            if p.requires_grad:
                p.normal_()
    weights = module.adapter_state_dict()
    write_peft_files(module.model, weights, folder)
    (folder / ADAPTER_METADATA).write_text(json.dumps({"base_model": base, "quantize": "nf4"}))
    return weights


def test_new_adapters_start_from_the_init_adapter(tmp_path):
    saved = trained_adapter(tmp_path / "chat")
    module = QLoRAModule(name_or_path="tiny-random", lora=LoraArgs(**LORA), init_adapter=str(tmp_path / "chat"))
    module.configure_model()
    loaded = module.adapter_state_dict()
    assert set(loaded) == set(saved)
    for name, value in saved.items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0)
    assert all(p.requires_grad for n, p in module.named_parameters() if "lora_" in n)  # they still train


@pytest.mark.parametrize(("lora", "message"), [
    ({**LORA, "r": 4}, r"has r=8, but this run has lora.r=4: pass --model.lora.r 8"),
    ({**LORA, "alpha": 32}, r"has alpha=16, but this run has lora.alpha=32"),
    ({**LORA, "target_modules": ["q_proj", "v_proj"]}, r"adapts \[.*'up_proj'.*\], but this run's lora.target_modules"),
])
def test_an_adapter_of_other_shape_is_refused_naming_both_values(tmp_path, lora, message):
    trained_adapter(tmp_path / "chat")
    module = QLoRAModule(name_or_path="tiny-random", lora=LoraArgs(**lora), init_adapter=str(tmp_path / "chat"))
    with pytest.raises(ValueError, match=message):
        module.configure_model()
    assert module.model is None  # refused before the base was loaded


def test_an_adapter_of_another_base_is_refused_naming_both(tmp_path):
    trained_adapter(tmp_path / "chat", base="smollm2-135m")
    module = QLoRAModule(name_or_path="tiny-random", lora=LoraArgs(**LORA), init_adapter=str(tmp_path / "chat"))
    with pytest.raises(ValueError, match="trained on base 'smollm2-135m', but this run's base is 'tiny-random'"):
        module.configure_model()


def test_a_folder_without_adapter_files_is_named(tmp_path):
    module = QLoRAModule(name_or_path="tiny-random", lora=LoraArgs(**LORA), init_adapter=str(tmp_path))
    with pytest.raises(ValueError, match="is no adapter folder .* runs/finetome/checkpoints/last"):
        module.configure_model()


def test_cli_replay_answers_come_from_the_init_adapter(tmp_path):
    from lit_llama_lab.cli import LabCLI
    from lit_llama_lab.data.datamodule import ChatDataModule

    args = ["--config", "configs/debug.yaml", "--model.init_adapter", str(tmp_path / "chat"), "--model.quantize", "fp4"]
    cli = LabCLI(QLoRAModule, ChatDataModule, args=args, run=False)
    assert cli.datamodule.replay.model == str(tmp_path / "chat")
    assert cli.datamodule.replay.quantize == "fp4"
    cli = LabCLI(QLoRAModule, ChatDataModule, args=["--config", "configs/debug.yaml"], run=False)
    assert cli.datamodule.replay.model == "tiny-random"
