"""SyncBatchNorm2d: two gloo processes with half a batch each equal one BatchNorm2d over the whole batch."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from protloc.nn.syncbn import SyncBatchNorm2d, convert_sync_batchnorm


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 5, 4, generator=g) * 3 + 1
    w = torch.randn(6, 3, 5, 4, generator=g)  # weights of the loss, so that the gradient is not trivial
    return x, w


def _reference() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(3, momentum=0.3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    x, w = _data()
    x.requires_grad_(True)
    y = bn(x)
    (y * w).sum().backward()
    return {
        "y": y.detach(),
        "dx": x.grad,
        "dw": bn.weight.grad,
        "db": bn.bias.grad,
        "mean": bn.running_mean,
        "var": bn.running_var,
    }


def _worker(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        torch.manual_seed(1)
        bn = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3, momentum=0.3)))[0]
        assert isinstance(bn, SyncBatchNorm2d)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
        x, w = _data()
        sl = slice(rank * 3, rank * 3 + 3)
        xs = x[sl].clone().requires_grad_(True)
        y = bn(xs)
        (y * w[sl]).sum().backward()
        grads = torch.cat([bn.weight.grad, bn.bias.grad])
        dist.all_reduce(grads)  # what DDP sums (then averages) across processes
        torch.save(
            {
                "y": y.detach(),
                "dx": xs.grad,
                "dw": grads[:3],
                "db": grads[3:],
                "mean": bn.running_mean,
                "var": bn.running_var,
            },
            f"{out}/{rank}.pt",
        )
        dist.barrier()  # neither process tears the group down while the other still talks to it
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_batchnorm_over_the_whole_batch(tmp_path: Path) -> None:
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(init, str(tmp_path)), nprocs=2, join=True)
    ref = _reference()
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    torch.testing.assert_close(torch.cat([p["y"] for p in parts]), ref["y"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([p["dx"] for p in parts]), ref["dx"], atol=1e-5, rtol=1e-5)
    for p in parts:
        for k in ("dw", "db", "mean", "var"):
            torch.testing.assert_close(p[k], ref[k], atol=1e-5, rtol=1e-5)


def test_one_process_and_eval_mode_are_plain_batchnorm() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    sync = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4)))
    sync.load_state_dict(nn.Sequential(bn).state_dict())
    x = torch.randn(8, 4, 3, 3)
    torch.testing.assert_close(sync(x), bn(x), rtol=0, atol=0)
    sync.eval(), bn.eval()
    torch.testing.assert_close(sync(x), bn(x), rtol=0, atol=0)
    assert set(sync.state_dict()) == {f"0.{k}" for k in bn.state_dict()}


def test_conversion_keeps_the_parameter_objects() -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    before = [id(p) for p in model.parameters()]
    convert_sync_batchnorm(model)
    assert isinstance(model[1], SyncBatchNorm2d) and isinstance(model[2][0], SyncBatchNorm2d)
    assert [id(p) for p in model.parameters()] == before  # an optimizer built earlier still holds them
