"""Where does a training step's time go? Times collate, forward/backward/step and batched generation."""

import sys
import time

import torch

from lit_llama_lab.cli import LabCLI
from lit_llama_lab.data.datamodule import ChatDataModule
from lit_llama_lab.generation import generate
from lit_llama_lab.module import QLoRAModule, label_loss


def main():
    cli = LabCLI(QLoRAModule, ChatDataModule, args=sys.argv[1:], run=False)
    data, module = cli.datamodule, cli.model
    data.setup("fit")
    module.configure_model()
    model = module.model
    opt = module.configure_optimizers()
    loader = data.train_dataloader()
    it = iter(loader)
    t = time.perf_counter()
    batches = [next(it) for _ in range(40)]
    print(f"collate: {(time.perf_counter() - t) / 40 * 1000:.1f} ms/batch", flush=True)
    dev = next(model.parameters()).device
    batches = [{k: v.to(dev) if hasattr(v, "to") else v for k, v in b.items()} for b in batches]
    for phase, n in (("warm", 5), ("timed", 30)):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for b in batches[:n]:
            loss, _, _ = label_loss(model, b)
            loss.backward()
            opt.step()
            opt.zero_grad()
        torch.cuda.synchronize()
        print(f"{phase}: {(time.perf_counter() - t) / n * 1000:.1f} ms/step, loss {loss.item():.3f}, "
              f"rows {b['input_ids'].shape}", flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as p:
        for b in batches[:3]:
            loss, _, _ = label_loss(model, b)
            loss.backward()
            opt.step()
            opt.zero_grad()
        torch.cuda.synchronize()
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
    print(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=12), flush=True)
    rows = list(data.rows["test"])[:128]
    chats = [[{"role": "user", "content": f"What is {r['character']}?"}] for r in rows]
    torch.cuda.synchronize()
    t = time.perf_counter()
    answers = generate(model, module.tokenizer, chats, max_new_tokens=40, batch_size=128)
    torch.cuda.synchronize()
    print(f"generate 128 prompts: {time.perf_counter() - t:.1f} s; stopped {sum(a.stopped for a in answers)}", flush=True)


if __name__ == "__main__":
    main()
