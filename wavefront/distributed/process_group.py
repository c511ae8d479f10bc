"""Where this process stands in a torch.distributed process group, refusing a missing one."""
from __future__ import annotations

import torch.distributed as dist


def position(group, user: str, action: str) -> tuple[int, int]:
    """(this process's rank in `group`, the group's size). `user` names what needs the group
    ("wavefront.distributed scans need"), `action` what to do on its ranks only ("call the scan").

    >>> position(None, "this example needs", "run it")
    Traceback (most recent call last):
    ...
    ValueError: this example needs a process group: call torch.distributed.init_process_group(...) on every rank first
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{user} a process group: call torch.distributed.init_process_group(...) on every rank first")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"this process is not a member of `group`: {action} on the group's ranks only")
    return rank, dist.get_world_size(group)


__all__ = ["position"]
