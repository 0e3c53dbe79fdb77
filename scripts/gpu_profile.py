"""Where does a GPU training step's time go? The floor of the step (no Lightning), eager vs CUDA graphs, and the
cost of the sample generations, on real batches of a config.

    python scripts/gpu_profile.py --config configs/emoji.yaml
"""

import sys
import time

import torch

from lit_llama_lab.cli import LabCLI
from lit_llama_lab.data.datamodule import ChatDataModule
from lit_llama_lab.fast import fast_label_loss
from lit_llama_lab.generation import generate
from lit_llama_lab.module import QLoRAModule


def steps_per_second(module, batches, optimizer, graphs: bool) -> float:
    """ms per step (loss, backward, clip, AdamW) over ``batches``, one sync at the end only."""
    module.hparams.cuda_graphs = graphs
    params = [p for p in module.parameters() if p.requires_grad]
    for phase in ("warm", "timed"):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in batches if phase == "timed" else batches[:6]:
            loss = module.training_loss(batch) if graphs else fast_label_loss(module.model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / len(batches) * 1000


def main():
    cli = LabCLI(QLoRAModule, ChatDataModule, args=sys.argv[1:], run=False)
    data, module = cli.datamodule, cli.model
    data.setup("fit")
    module.configure_model()
    optimizer = module.configure_optimizers()
    loader = iter(data.train_dataloader())
    start = time.perf_counter()
    # as Lightning gives them: with num_labelled and max_documents (varlen's offsets need it; without it the graphed
    # step would take the mask). The eager line times fast_label_loss with the mask (sdpa) whatever the attention.
    cpu_batches = [data.on_before_batch_transfer(next(loader), 0) for _ in range(60)]
    print(f"collate: {(time.perf_counter() - start) / 60 * 1000:.1f} ms/batch", flush=True)
    batches = [{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in cpu_batches]
    print(f"attention: {module.attention}", flush=True)
    for graphs in (False, True, False, True):
        print(f"{'graphs' if graphs else 'eager '}: {steps_per_second(module, batches, optimizer, graphs):.1f} ms/step "
              f"(no per-step sync; loss, backward, clip, fused AdamW)", flush=True)
    print(f"graphs captured: {len(module._graphed.graphs)}, eager fallbacks: {module._graphed.eager_calls}")
    chats = [[{"role": "user", "content": f"What is {e}?"}] for e in "🐼🇺🇸🎂🤌👋🏽🦩🧑‍🚀"] + [[{"role": "user", "content": "Hi"}]]
    for _ in range(2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        generate(module.model, module.tokenizer, chats, max_new_tokens=24)
        torch.cuda.synchronize()
        print(f"generate 8 chats x 24 tokens: {time.perf_counter() - start:.2f} s", flush=True)


if __name__ == "__main__":
    main()
