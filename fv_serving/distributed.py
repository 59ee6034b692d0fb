"""torch.distributed for learning: who this process is, and the few collectives learning needs.

Learning runs the same code in one process or in N (torchrun). A `Dist` says which
rank this process is among how many, and offers what `unlearn` and `pipeline` need:
a slice of the global batch, a shard of an index set, a sum over ranks, a gather.
With one process every collective is the identity, so nothing branches on it.

    torchrun --standalone --nproc_per_node 2 -m fv_serving.cli.main learn ...
    fv learn ... --nproc 2          # the same, launched for you

Multi-node: start the same command on every node with a shared rendezvous, e.g.
`torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29400
--rdzv_id JOB -m fv_serving.cli.main bank ...`; nothing here depends on the node count.
The backend is gloo on CPU and nccl on GPU (each rank on cuda:LOCAL_RANK).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fv_serving.errors import InvalidInputError


@dataclass(frozen=True)
class Dist:
    """This process's place in the group (rank 0 of 1 without torch.distributed)."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"  # where collectives' tensors live (nccl needs cuda tensors)

    @property
    def is_main(self) -> bool:
        """The one rank that writes files and prints."""
        return self.rank == 0

    def batch_slice(self, batch_size: int) -> slice:
        """This rank's contiguous part of a global batch (parts differ by at most one sample)."""
        start = batch_size * self.rank // self.world
        return slice(start, batch_size * (self.rank + 1) // self.world)

    def shard(self, items: torch.Tensor) -> torch.Tensor:
        """Every world-th element, from this rank's position: an even split of an index set."""
        return items[self.rank :: self.world]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (and returned)."""
        if self.world > 1:
            moved = tensor.to(self.device)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            if moved is not tensor:
                tensor.copy_(moved)
        return tensor

    def sum_gradients(self, module: torch.nn.Module) -> None:
        """Sum every parameter's gradient over ranks (each rank's loss is its share of the global batch's)."""
        for p in module.parameters():
            if p.grad is not None:
                self.all_reduce_sum(p.grad)

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


SINGLE = Dist()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def process_group(device: str) -> Iterator[tuple[Dist, str]]:
    """(this process's Dist, the device it learns on): torchrun's group when launched by it, else SINGLE.

    The group is created here and destroyed on exit; under nccl every rank takes the
    GPU of its LOCAL_RANK.
    """
    if not launched_by_torchrun():
        yield SINGLE, device
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    try:
        yield Dist(dist.get_rank(), dist.get_world_size(), device), device
    finally:
        dist.destroy_process_group()


def torchrun_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """The command that runs `fv <argv>` on `nproc` local processes under torch.distributed.run."""
    if nproc < 1:
        raise InvalidInputError(f"--nproc must be >= 1, got {nproc}")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "fv_serving.cli.main",
        *argv,
    ]


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run `fv <argv>` under torch.distributed.run on this machine; its exit status."""
    if launched_by_torchrun():
        raise InvalidInputError("--nproc given inside a torchrun process: give one or the other")
    # One intra-op thread per rank unless the user chose: N ranks already share the cores.
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    return subprocess.run(torchrun_command(nproc, argv), env=env, check=False).returncode
