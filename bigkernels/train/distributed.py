"""Distributed data parallel under torchrun: `torchrun --nproc_per_node=N script.py` runs the same
fit() loop in N processes. The process group is set up from torchrun's environment variables
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): gloo for CPU models, nccl for CUDA models."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class ProcessInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def setup(device: torch.device) -> ProcessInfo:
    """Join the process group (once) when launched by torchrun with more than one process; the
    backend follows the model's device: nccl for CUDA, gloo otherwise."""
    if dist.is_available() and dist.is_initialized():
        return ProcessInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if not launched_by_torchrun():
        return ProcessInfo()
    if not dist.is_available():
        raise RuntimeError("launched by torchrun, but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return ProcessInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def device_for(model_device: torch.device, info: ProcessInfo) -> torch.device:
    """One GPU per process under torchrun: cuda:<LOCAL_RANK>; CPU stays CPU."""
    if model_device.type == "cuda" and info.distributed:
        return torch.device("cuda", info.local_rank)
    return model_device


def wrap(model: nn.Module, device: torch.device, info: ProcessInfo) -> nn.Module:
    if not info.distributed:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def mean_over_processes(value: float, info: ProcessInfo, device: torch.device) -> float:
    """The mean of a logged scalar over all processes (every process must call it)."""
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / info.world_size


def gather_objects(obj, info: ProcessInfo) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every process."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: ProcessInfo) -> None:
    if info.distributed:
        dist.barrier()
