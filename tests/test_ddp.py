"""SET under DistributedDataParallel: 2 processes on gloo hold identical topologies and weights."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
STEPS = 13
INTERVAL = 3  # updates at steps 3, 6, 9, 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str, regrow: str, prune: str, block_size: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        import set_kernels as sk
        from set_kernels.nn import MaskedLinear, SparseLinear

        g = torch.Generator().manual_seed(0)  # same initial model on every rank
        model = torch.nn.Sequential(MaskedLinear(40, 48, density=0.25, generator=g), torch.nn.ReLU(),
                                    SparseLinear(48, 37, density=0.5 if block_size > 1 else 0.2,
                                                 block_size=block_size, generator=g))
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        evo = sk.SET(ddp, opt, zeta=0.3, interval=INTERVAL, regrow=regrow, prune=prune, seed=3)
        data = torch.Generator().manual_seed(100 + rank)  # every rank sees different data
        changed = []
        for _ in range(STEPS):
            x = torch.randn(8, 40, generator=data)
            y = torch.randn(8, 37, generator=data)
            loss = torch.nn.functional.mse_loss(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            changed.append(evo.step())
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["layout_index"] = model[2].layout.index.clone()
        state["momentum"] = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
        state["changed"] = changed
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("block_size", [16, 1])
@pytest.mark.parametrize("regrow,prune", [("gradient", "magnitude"), ("random", "set")])
def test_ddp_ranks_agree(tmp_path, regrow, prune, block_size):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.fail("torch.distributed with the gloo backend is required")
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), regrow, prune, block_size), nprocs=WORLD, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert r0["changed"] == r1["changed"] == [(s + 1) % INTERVAL == 0 for s in range(STEPS)]
    for key in r0:
        if key in ("changed",):
            continue
        if key == "momentum":
            for a, b in zip(r0[key], r1[key]):
                assert torch.equal(a, b), key
        else:
            assert torch.equal(r0[key], r1[key]), key
    # the topology did move from the initial one (same generator as the workers)
    from set_kernels.nn import MaskedLinear

    g = torch.Generator().manual_seed(0)
    initial = MaskedLinear(40, 48, density=0.25, generator=g)
    assert not torch.equal(initial.mask, r0["0.mask"])
    assert int(r0["0.mask"].sum()) == int(initial.mask.sum())
