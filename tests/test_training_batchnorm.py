"""carso_cli.training.batchnorm: ``CrossRankBatchNorm`` (the global batch's statistics on CPU/gloo) and
``convert_sync_batchnorm``."""

from __future__ import annotations

import copy
import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from carso_cli import training as tr

C = 3
SHARDS = ((0, 3), (3, 8))  # uneven on purpose: the element count is all-reduced too
MOMENTA = (0.1, None)  # exponential and cumulative running averages


def _pair(momentum: float | None, seed: int = 0) -> tuple[nn.BatchNorm2d, tr.CrossRankBatchNorm]:
    """A reference BatchNorm2d and a CrossRankBatchNorm with the same (non-trivial) affine parameters."""
    torch.manual_seed(seed)
    ref = nn.BatchNorm2d(C, momentum=momentum).double()
    with torch.no_grad():
        ref.weight.copy_(torch.rand(C) + 0.5)
        ref.bias.copy_(torch.randn(C))
    ours = tr.CrossRankBatchNorm(C, momentum=momentum).double()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step (8, C, 4, 4), off-centre and scaled, and the weights of a linear loss."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, C, 4, 4, generator=g, dtype=torch.float64) * 3 + 2
    w = torch.randn(8, C, 4, 4, generator=g, dtype=torch.float64)
    return x, w


def _assert_same_stats(a: nn.Module, b: nn.Module) -> None:
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(a, name), getattr(b, name), rtol=1e-12, atol=1e-12), name


@pytest.mark.parametrize("momentum", MOMENTA)
def test_outside_a_process_group_it_is_batchnorm2d(momentum: float | None) -> None:
    assert not dist.is_initialized()
    ref, ours = _pair(momentum)
    for step in range(3):  # train mode: batch statistics, running statistics updated
        x, _ = _data(step)
        assert torch.allclose(ours(x), ref(x), rtol=1e-12, atol=1e-12)
        _assert_same_stats(ours, ref)
    assert int(ours.num_batches_tracked) == 3
    ref.eval(), ours.eval()  # eval mode: running statistics, no update
    x, _ = _data(9)
    assert torch.allclose(ours(x), ref(x), rtol=1e-12, atol=1e-12)
    _assert_same_stats(ours, ref)
    assert int(ours.num_batches_tracked) == 3


def _rank_worker(rank: int, world: int, store: str, out: str) -> None:
    """One rank: two training steps on its shard with each momentum, then an eval pass; results to a file."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )  # a hang fails, not blocks
    try:
        lo, hi = SHARDS[rank]
        results = {}
        for momentum in MOMENTA:
            _, bn = _pair(momentum)
            steps = []
            for step in range(2):
                x, w = _data(step)
                x = x[lo:hi].clone().requires_grad_(True)
                bn.zero_grad()
                y = bn(x)
                (y * w[lo:hi]).sum().backward()
                steps.append(
                    {
                        "out": y.detach(),
                        "x_grad": x.grad,
                        "weight_grad": bn.weight.grad.clone(),
                        "bias_grad": bn.bias.grad.clone(),
                    }
                )
            bn.eval()
            x, _ = _data(9)
            results[str(momentum)] = {"steps": steps, "state": bn.state_dict(), "eval_out": bn(x[lo:hi]).detach()}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process_on_the_global_batch(tmp_path: Path) -> None:
    """Each rank's rows, the running statistics and the gradients (input rows on each rank; weight and bias
    summed over ranks, as DDP's all-reduce does) equal nn.BatchNorm2d on the concatenated global batch."""
    # fork: the children start at once, without importing torch again (spawn costs seconds per process).
    mp.start_processes(
        _rank_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    tight = {"rtol": 1e-10, "atol": 1e-10}
    for momentum in MOMENTA:
        ref, _ = _pair(momentum)
        got = [r[str(momentum)] for r in ranks]
        for step in range(2):
            x, w = _data(step)
            x = x.clone().requires_grad_(True)
            ref.zero_grad()
            y = ref(x)
            (y * w).sum().backward()
            for r, (lo, hi) in enumerate(SHARDS):
                s = got[r]["steps"][step]
                assert torch.allclose(s["out"], y.detach()[lo:hi], **tight)
                assert torch.allclose(s["x_grad"], x.grad[lo:hi], **tight)
            for name in ("weight", "bias"):
                summed = got[0]["steps"][step][f"{name}_grad"] + got[1]["steps"][step][f"{name}_grad"]
                assert torch.allclose(summed, getattr(ref, name).grad, **tight), name
        for r in range(2):
            state = got[r]["state"]
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                assert torch.allclose(state[name], getattr(ref, name), **tight), (momentum, r, name)
        ref.eval()
        x, _ = _data(9)
        expected = ref(x).detach()
        for r, (lo, hi) in enumerate(SHARDS):
            assert torch.allclose(got[r]["eval_out"], expected[lo:hi], **tight)


def test_convert_sync_batchnorm_on_cpu_keeps_the_tensors_and_modes() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, momentum=None, affine=False)),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
        nn.BatchNorm1d(5),
    )
    model[3].eval()  # a frozen part must stay frozen
    params = {k: v for k, v in model.named_parameters()}
    buffers = {k: v for k, v in model.named_buffers()}
    keys = list(model.state_dict())
    modes = {name: m.training for name, m in model.named_modules()}
    reference = copy.deepcopy(model)

    out = tr.convert_sync_batchnorm(model, torch.device("cpu"))

    bns = [m for m in out.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 3 and all(type(m) is tr.CrossRankBatchNorm for m in bns)
    assert list(out.state_dict()) == keys
    assert all(v is params[k] for k, v in out.named_parameters()) and len(params) == len(list(out.parameters()))
    assert all(v is buffers[k] for k, v in out.named_buffers()) and len(buffers) == len(list(out.buffers()))
    assert {name: m.training for name, m in out.named_modules()} == modes
    assert out[3][1].momentum is None and not out[3][1].affine
    # It computes what the unconverted model computes (outside a process group), in both modes.
    x = torch.rand(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out(x), reference(x))
    assert all(torch.equal(a, b) for a, b in zip(out.state_dict().values(), reference.state_dict().values()))
    out.eval(), reference.eval()
    assert torch.equal(out(x), reference(x))
