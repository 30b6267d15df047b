"""Process-group set-up for ``torchrun`` (DistributedDataParallel), and small collectives.

``torchrun --nproc_per_node=N -m torchslim run RECIPE`` starts N copies of the
CLI with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set; :func:`init_distributed`
joins them into one group (gloo on CPU, nccl on CUDA). A plain single-process
run never touches ``torch.distributed`` and takes the same code paths with a
world size of 1.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as torch_dist

from torchslim.errors import ConfigError
from torchslim.train.loop import DistContext


def init_distributed(device: str) -> tuple[DistContext, torch.device]:
    """Join torchrun's process group if the environment asks for one.

    Returns:
        This process's rank context and the device it should use (``cuda:LOCAL_RANK``
        under a multi-GPU run).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    target = torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("recipe asks for device 'cuda' but torch sees no CUDA device; set device: cpu")
    if world_size <= 1:
        return DistContext(), target
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if target.type == "cuda":
        target = torch.device("cuda", local_rank)
        torch.cuda.set_device(target)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
    return DistContext(torch_dist.get_rank(), torch_dist.get_world_size(), local_rank), target


def broadcast_object(value: Any, dist: DistContext) -> Any:
    """Rank 0's ``value``, on every rank."""
    if dist.world_size == 1:
        return value
    box = [value]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(dist: DistContext) -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.world_size > 1:
        torch_dist.barrier()


def shutdown(dist: DistContext) -> None:
    """Leave the process group at the end of a run."""
    if dist.world_size > 1 and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
