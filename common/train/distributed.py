"""One training run on several processes: torchrun + DistributedDataParallel (DDP).

`torchrun --nproc_per_node=N stage2_distill.py ...` starts N copies of stage 2; torchrun sets
RANK, WORLD_SIZE and LOCAL_RANK, which `from_env` reads. Without torchrun every function here is
the single-process identity, so the training loop has one code path.

How the work is split (`shard`): each rank owns a fixed, disjoint share of the training rows
(every WORLD_SIZE-th position of the sorted training subset, cut to equal length) and loads only
those rows of the feature cache, so N ranks on one machine hold the cache once between them, not
N times. Each epoch a rank shuffles its own rows and takes batches of batch_size / N: the global
batch keeps the configured size, and DDP's gradient average over ranks equals the gradient of the
mean loss over the global batch. Rank 0 writes every artifact; metrics are summed over ranks.

BatchNorm: on GPUs it becomes SyncBatchNorm (statistics over the global batch, as in one process).
torch has no SyncBatchNorm on the CPU, so gloo runs keep per-rank statistics (plain DDP).
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from common.errors import ConfigError

log = logging.getLogger("kd")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank among `world` processes, GPU `local_rank` on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def is_main(self) -> bool:
        """The one writer of artifacts and log lines."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


SINGLE = Ranks()


def from_env() -> Ranks:
    """The ranks torchrun describes in the environment; SINGLE without torchrun."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError:
        raise ConfigError("WORLD_SIZE, RANK, LOCAL_RANK must be integers (set by torchrun); unset them or start with torchrun") from None
    return Ranks(rank, world, local_rank, local_world) if world > 1 else SINGLE


def device_for(ranks: Ranks, device: torch.device) -> torch.device:
    """Each rank's device: its own GPU (cuda:LOCAL_RANK) under torchrun, else `device`."""
    if not ranks.distributed or device.type != "cuda":
        return device
    if device.index not in (None, ranks.local_rank):
        raise ConfigError(f"under torchrun each rank uses cuda:LOCAL_RANK, so train.device={device} is ambiguous; use train.device=auto or cuda")
    return torch.device("cuda", ranks.local_rank)


def init(ranks: Ranks, device: torch.device) -> None:
    """Join the process group (NCCL on GPUs, gloo on the CPU); a no-op without torchrun.

    The timeout is long because ranks wait for each other at the first collective while one of
    them loads its share of a large feature cache.
    """
    if not ranks.distributed or tdist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    tdist.init_process_group(backend, timeout=datetime.timedelta(hours=1))
    if ranks.is_main:
        log.info("torchrun: %d ranks, backend %s", ranks.world, backend)


def shard(indices: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """This rank's training rows: every world-th of the sorted `indices`, all ranks equally many
    (the remainder, fewer than `world` rows, is left out). The identity for one process."""
    if not ranks.distributed:
        return indices
    ordered = torch.sort(indices.reshape(-1)).values
    per_rank = len(ordered) // ranks.world
    return ordered[ranks.rank :: ranks.world][:per_rank]


def local_batch_size(batch_size: int, ranks: Ranks) -> int:
    """Each rank's share of the global batch."""
    if batch_size % ranks.world:
        raise ConfigError(
            f"train.batch_size={batch_size} does not split evenly over {ranks.world} ranks; "
            f"use a multiple of {ranks.world} (the global batch, e.g. {ranks.world * max(1, batch_size // ranks.world)})"
        )
    return batch_size // ranks.world


def wrap(model: nn.Module, ranks: Ranks, device: torch.device) -> nn.Module:
    """The module the training step calls: DDP around `model` under torchrun, else `model`.

    static_graph: a method may leave parameters without gradient every step (SimKD's unused
    student head), and it is the same set every step, which DDP then handles without a search
    of the graph per step.
    """
    if not ranks.distributed:
        return model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) and ranks.is_main:
        log.info("torchrun on the CPU: BatchNorm statistics are per rank (torch has no SyncBatchNorm on the CPU)")
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, static_graph=True)


def sum_over_ranks(values: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """`values` summed over every rank (float64 or int64 tensor on this rank's device)."""
    if ranks.distributed:
        tdist.all_reduce(values, op=tdist.ReduceOp.SUM)
    return values


def sync_buffers(model: nn.Module, ranks: Ranks) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, so that an evaluation
    split over ranks scores the model rank 0 saves."""
    if ranks.distributed:
        for buffer in model.buffers():
            tdist.broadcast(buffer, src=0)


def broadcast(obj: Any, ranks: Ranks) -> Any:
    """Rank 0's `obj` on every rank (a decision only rank 0 can make, e.g. under its file lock)."""
    if not ranks.distributed:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any, ranks: Ranks) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not ranks.distributed:
        return [obj]
    out: list[Any] = [None] * ranks.world
    tdist.all_gather_object(out, obj)
    return out


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        tdist.barrier()


def finish() -> None:
    """Leave the process group (end of a torchrun stage)."""
    if tdist.is_initialized():
        tdist.destroy_process_group()
