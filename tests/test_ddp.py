"""Two-process DDP (gloo): G, D and EMA weights stay bit-identical across ranks."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from infra.local.s3 import free_port
from sagan.config import load_config
from sagan.training import GANTrainer
from tests.fixtures.tiny import TINY

STEPS = 5


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = load_config(None, [*TINY, "train.workers=2", "train.ndis=2"])
    trainer = GANTrainer(cfg, rank=rank)
    assert trainer.distributed
    init = {k: v.clone() for k, v in trainer.G_raw.state_dict().items()}
    g = torch.Generator().manual_seed(100 + rank)  # different data on every rank

    def batches():
        while True:
            yield torch.rand(4, 1, 32, 32, generator=g) * 2 - 1, torch.randint(0, 3, (4,),
                                                                              generator=g)

    it = batches()
    losses = [trainer.train_step(it)["loss_d"].item() for _ in range(STEPS)]
    torch.save({"G": trainer.G_raw.state_dict(), "D": trainer.D_raw.state_dict(),
                "EMA": trainer.ema.state_dict(), "init": init, "losses": losses},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_rank_ddp_keeps_weights_identical(tmp_path):
    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for net in ("G", "D", "EMA"):
        assert r0[net].keys() == r1[net].keys()
        for k in r0[net]:
            assert torch.equal(r0[net][k], r1[net][k]), f"{net}.{k} differs across ranks"
    # meaningful: the ranks saw different data (different local losses), and weights moved
    assert r0["losses"] != r1["losses"]
    moved = [k for k in r0["init"] if not torch.equal(r0["init"][k], r0["G"][k])]
    assert len(moved) > 10
