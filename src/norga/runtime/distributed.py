"""Data parallelism across processes started by torchrun (gloo on CPU, nccl on GPU).

Every rank holds the same model, method state and class statistics. A global training batch (the
configured batch size, drawn from one seeded order shared by all ranks) is split into contiguous shards,
one per rank; each rank's loss is its share of the global objective, so summing the gradients over ranks
gives exactly the gradient one process computes on the whole batch. Work over whole datasets (frozen
features, prompted statistics, evaluation) is split by whole batches and gathered back in order, so every
rank ends with the same tensors. One process (``world_size == 1``) takes none of these paths.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

log = logging.getLogger("norga")

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
#: How long a collective waits for a stalled process before the job fails (seconds; torch's default is 30 minutes).
TIMEOUT_ENV, DEFAULT_TIMEOUT_SECONDS = "NORGA_DIST_TIMEOUT", 1800


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job; the default (rank 0 of 1) is a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    comm_device: str = "cpu"  # where tensors go for a collective: cpu (gloo) or this rank's cuda device (nccl)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run directory and prints; the others only compute."""
        return self.rank == 0

    # ------------------------------------------------------------ sharding
    def shard_sizes(self, count: int) -> list[int]:
        """Every rank's share of `count` items split contiguously (the first ranks take one more)."""
        base, extra = divmod(count, self.world_size)
        return [base + (1 if rank < extra else 0) for rank in range(self.world_size)]

    def shard_bounds(self, count: int) -> tuple[int, int]:
        """[start, stop) of this rank's contiguous part of `count` items."""
        sizes = self.shard_sizes(count)
        start = sum(sizes[: self.rank])
        return start, start + sizes[self.rank]

    def my_batches(self, num_batches: int) -> range:
        """The whole batches this rank handles when a dataset is mapped batch by batch (round robin)."""
        return range(self.rank, num_batches, self.world_size)

    # --------------------------------------------------------- collectives
    def all_sum(self, value: Tensor | float) -> Tensor | float:
        """The sum of `value` over ranks (a tensor comes back on its own device)."""
        if not self.enabled:
            return value
        tensor = torch.as_tensor(value, dtype=torch.float64).to(self.comm_device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.to(value.device) if isinstance(value, Tensor) else float(tensor)

    def sum_gradients(self, params: Sequence[Tensor]) -> None:
        """Sum the gradients of `params` over ranks in one flat all-reduce (a missing gradient counts as zero)."""
        if not self.enabled or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads]).to(self.comm_device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for param in params:
            size = param.numel()
            param.grad = flat[offset : offset + size].view_as(param).to(param.device, copy=True)
            offset += size

    def gather_rows(self, local: Tensor, counts: Sequence[int]) -> list[Tensor]:
        """Every rank's `local` rows (rank r has ``counts[r]`` of them), as a list indexed by rank."""
        if not self.enabled:
            return [local]
        padded = local.new_zeros((max(counts), *local.shape[1:]), device=self.comm_device)
        padded[: len(local)] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return [part[:count].to(local.device) for part, count in zip(parts, counts)]

    def gather_objects(self, value) -> list:
        """Every rank's picklable `value` (e.g. lists of CPU tensors), indexed by rank."""
        if not self.enabled:
            return [value]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def gather_batch(self, local: Tensor, counts: Sequence[int]) -> Tensor:
        """The global batch of per-sample tensors (rank order = batch order), differentiable.

        Each rank computes batch-coupled loss terms on the whole batch and divides them by the world size
        (`RunContext.replicated_term`); the backward hands this rank the gradient of its own rows,
        scaled back by the world size, so the summed gradients are those of one process.
        """
        if not self.enabled:
            return local
        return _GatherBatch.apply(local, self, tuple(counts))

    def broadcast_object(self, value):
        """Rank 0's `value` on every rank (e.g. a run directory name with a timestamp)."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


class _GatherBatch(torch.autograd.Function):
    """all_gather forward; backward: this rank's slice of the gradient times the world size."""

    @staticmethod
    def forward(ctx, local: Tensor, group: Distributed, counts: tuple[int, ...]) -> Tensor:
        ctx.group, ctx.counts = group, counts
        return torch.cat(group.gather_rows(local.detach(), counts))

    @staticmethod
    def backward(ctx, grad: Tensor):
        start = sum(ctx.counts[: ctx.group.rank])
        mine = grad[start : start + ctx.counts[ctx.group.rank]]
        return mine * ctx.group.world_size, None, None


SINGLE_PROCESS = Distributed()


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher setting the env:// variables)."""
    return all(key in os.environ for key in ENV_KEYS) and int(os.environ["WORLD_SIZE"]) > 1


def init_distributed(device_type: str) -> Distributed:
    """Join the torchrun job: nccl on CUDA, gloo otherwise; returns `SINGLE_PROCESS` when not launched so."""
    if not launched_by_torchrun():
        return SINGLE_PROCESS
    rank, world, local = (int(os.environ[key]) for key in ENV_KEYS)
    backend = "nccl" if device_type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=process_group_timeout()))
    log.info("distributed: rank %d of %d (%s)", rank, world, backend)
    return Distributed(rank, world, local, f"cuda:{local}" if backend == "nccl" else "cpu")


def process_group_timeout() -> float:
    """Seconds a collective may wait for the other processes: ``$NORGA_DIST_TIMEOUT``, else 30 minutes."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0 or seconds == float("inf"):
        from norga.config import ConfigError

        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} must be a positive number of seconds, e.g. {TIMEOUT_ENV}=600")
    return seconds


def shutdown_distributed(clean: bool = True) -> None:
    """Leave the job: after a clean end every process first waits for the others (none still talks to this
    one), then the process group is destroyed, so its threads are joined before the interpreter exits. After
    a failure the barrier is skipped (the others may never arrive)."""
    if not dist.is_initialized():
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()
