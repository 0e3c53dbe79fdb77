"""QLoRAModule: adapters only train and are saved, the module's mode, the plan's TF32, resuming checks."""

import pytest
import torch

from lit_llama_lab.speed.loss import label_loss
from lit_llama_lab.train.args import LoraArgs
from lit_llama_lab.train.module import QLoRAModule
from tests.helpers import emoji_batch, make_module


def test_only_adapters_train_and_are_saved():
    module = make_module()
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # every projection of every layer got an adapter
    assert sum("lora_A" in n for n in trainable) == 2 * 7
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == set(trainable)
    assert checkpoint["adapter_config"]["use_rslora"] is True


def test_loaded_model_takes_the_module_mode():
    """from_pretrained returns eval mode; training needs every layer in train mode (dropout, checkpointing)."""
    module = QLoRAModule(name_or_path="tiny-random", lora=LoraArgs(r=8, dropout=0.1))
    module.configure_model()
    assert all(m.training for m in module.model.modules())


def test_configure_model_is_idempotent():
    module = make_module()
    model = module.model
    module.configure_model()
    assert module.model is model


def test_label_loss_equals_hf_loss_on_padded_batch(tiny_base):
    model, tok = tiny_base
    batch = emoji_batch(tok, 4)
    ours, _, targets = label_loss(model, batch)
    hf = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}, labels=batch["labels"]).loss
    torch.testing.assert_close(ours, hf, rtol=1e-5, atol=1e-5)
    assert targets.numel() == (batch["labels"][:, 1:] != -100).sum()


def test_checkpoint_missing_adapter_weights_is_refused():
    module = make_module()
    with pytest.raises(ValueError, match="other LoRA settings"):
        module.on_load_checkpoint({"state_dict": {}})


@pytest.mark.slow
def test_smollm2_4bit_loss_falls_on_fixed_batch():
    torch.manual_seed(0)
    module = make_module("smollm2-135m", learning_rate=2e-3, compute_dtype="float32")
    device = next(module.model.parameters()).device  # CUDA on the GPU host
    batch = {k: v.to(device) for k, v in emoji_batch(module.tokenizer, 8).items()}
    optimizer = module.configure_optimizers()
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad and p.dtype.is_floating_point}
    losses = []
    for _ in range(6):
        loss, _, _ = label_loss(module.model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    for n, p in module.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_tf32_is_set_for_cuda_training_only():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        make_module(tf32=False)
        assert torch.get_float32_matmul_precision() == "highest"
        make_module()  # tf32 on by default: TF32 on a GPU, nothing to do on a CPU
        assert torch.get_float32_matmul_precision() == ("high" if torch.cuda.is_available() else "highest")
    finally:
        torch.set_float32_matmul_precision(before)
