"""Distributed setup for stages launched by `torchrun` (DDP); a no-op in a single process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lmpipe.config import ParamsError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def check_cuda(device_name: str, key: str) -> None:
    """Raise if param `key`'s `device_name` (cuda or cuda:N) names a GPU this machine lacks."""
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        raise ParamsError(
            f"{key} = {device_name!r} but CUDA is not available here; use auto or cpu"
        )
    if device_name.startswith("cuda:") and int(device_name[5:]) >= torch.cuda.device_count():
        raise ParamsError(
            f"{key} = {device_name!r} but this machine has {torch.cuda.device_count()} GPU(s)"
        )


def setup(device_name: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    check_cuda(device_name, "device")
    cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if device_name.startswith("cuda:"):
        device = torch.device(device_name)
    elif cuda:
        device = torch.device("cuda", local if world > 1 else 0)
    elif device_name in ("auto", "cpu"):
        device = torch.device("cpu")
    else:
        raise ParamsError(f"device = {device_name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local), device


def place(key: str, device_name: str, default: torch.device) -> torch.device:
    """A frozen model's device (param `key`: `rl.reference_device`, `rl.reward_device`): auto
    is `default` (the trained model's), else cpu, cuda (this rank's GPU) or cuda:N."""
    if device_name == "auto":
        return default
    check_cuda(device_name, key)
    if device_name == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device_name)


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def teardown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the process group torchrun set up, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard(n: int) -> list[int]:
    """This rank's share of n units (prompts, prompt groups): every world-th, from its rank."""
    rank, world = rank_world()
    return list(range(rank, n, world))


def gather_shards(mine: list, n: int) -> list:
    """Every rank's `mine` (its items for `shard(n)`, in that order) gathered into the n items
    in unit order, on every rank; any picklable items (`all_gather_object`: gloo and NCCL)."""
    world = rank_world()[1]
    if world == 1:
        return list(mine)
    parts: list = [None] * world
    torch.distributed.all_gather_object(parts, list(mine))
    return [parts[i % world][i // world] for i in range(n)]
