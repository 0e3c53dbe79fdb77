"""QLoRADDPStrategy's own choices (its training is tested on real gloo ranks in ``tests/e2e/test_ddp.py``)."""

import pytest

from lit_llama_lab.train.ddp import QLoRADDPStrategy


def test_wrapper_options_that_would_do_nothing_are_refused_but_defaults_pass():
    with pytest.raises(ValueError, match=r"does not wrap the model.*\['static_graph'\]"):
        QLoRADDPStrategy(static_graph=True)
    strategy = QLoRADDPStrategy(static_graph=False, find_unused_parameters=False, ddp_comm_hook=None)
    assert strategy.token_weighted
    assert not QLoRADDPStrategy(token_weighted=False).token_weighted


def _bucket_rank(rank: int, init_file: str, queue) -> None:
    import torch
    import torch.distributed as dist

    from lit_llama_lab.train.ddp import GradientBucket

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        a = torch.nn.Parameter(torch.zeros(3, 2))
        b = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
        unused = torch.nn.Parameter(torch.zeros(2))  # no gradient on either rank
        bucket = GradientBucket([a, b, unused])
        results = []
        for step, weighted in enumerate([True, False, True]):  # the same bucket, step after step
            a.grad = torch.full((3, 2), float(rank + 1 + step))
            b.grad = torch.full((4,), float(10 * (rank + 1)), dtype=torch.bfloat16)
            unused.grad = None
            bucket.all_reduce(weight=(1.0 if rank == 0 else 3.0) if weighted else None)
            # plain lists, not tensors: a tensor sent through the queue shares its storage by a file descriptor the
            # parent fetches from this process, which may have exited by then
            results.append([(str(g.dtype).removeprefix("torch."), g.tolist()) for g in (a.grad, b.grad, unused.grad)])
        queue.put((rank, results))
    finally:
        dist.destroy_process_group()


def test_gradient_bucket_averages_by_token_weight_step_after_step(tmp_path):
    """Two gloo ranks with token weights 1 and 3: each gradient becomes (1 g0 + 3 g1) / 4, bf16 gradients too, a
    parameter without a gradient gets zeros; unweighted, the plain mean. The bucket is reused over steps."""
    import torch
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_bucket_rank, args=(r, str(tmp_path / "init"), queue)) for r in range(2)]
    for p in procs:
        p.start()
    out = {rank: [[torch.tensor(values, dtype=getattr(torch, dtype)) for dtype, values in step] for step in steps]
           for rank, steps in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank in (0, 1):
        steps = out[rank]
        for step, weighted in enumerate([True, False, True]):
            a, b, unused = steps[step]
            g0, g1 = 1 + step, 2 + step
            expect_a = (g0 + 3 * g1) / 4 if weighted else (g0 + g1) / 2
            expect_b = (10 + 3 * 20) / 4 if weighted else 15.0
            assert torch.equal(a, torch.full((3, 2), expect_a)), (rank, step, a)
            assert b.dtype == torch.bfloat16 and torch.equal(b, torch.full((4,), expect_b, dtype=torch.bfloat16))
            assert torch.equal(unused, torch.zeros(2))
