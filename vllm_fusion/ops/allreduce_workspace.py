"""Peer-addressable workspaces of the fused all-reduce, one per process group.

Each rank allocates one buffer through torch symmetric memory (``symm_mem.empty`` +
``rendezvous``: peer mappings over NVLink, no multicast needed) laid out as the kernel expects:
``all_reduce_flag_bytes()`` of flags, zeroed before any peer can signal, then four halves of
``capacity`` bytes (input and result, double-buffered). A small int64 counter per rank numbers
the calls.

Workspaces are made lazily, by the first call of the op on a group: a compiled graph loaded from
vLLM's cache runs no pass constructor, so nothing may depend on one. Creation is collective and
all ranks agree on the outcome: when any rank fails, every rank gets no workspace and the op
runs the unfused all-reduce instead, so ranks never disagree on the path (which would hang).
Nothing here imports vLLM.
"""

from __future__ import annotations

import atexit
import logging
import threading
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Under vLLM's "vllm" logger (its format and VLLM_LOGGING_LEVEL) without importing vLLM.
logger = logging.getLogger(f"vllm.{__name__}")


@dataclass
class AllReduceWorkspace:
    buffer: torch.Tensor  # this rank's symmetric buffer (kept alive here)
    handle: object  # torch's _SymmetricMemory for the buffer
    buffers: list[int]  # every rank's buffer address, in this process's mapping
    counter: torch.Tensor  # int64 [2]: last finished call, blocks done
    rank: int
    world_size: int
    capacity: int  # bytes of one half

    def fits(self, t: torch.Tensor) -> bool:
        return t.numel() * t.element_size() <= self.capacity

    def fits_push(self, t: torch.Tensor) -> bool:
        """Whether the push one-shot can take ``t``: one slot of it per rank."""
        return self.world_size * t.numel() * t.element_size() <= self.capacity


# group key -> workspace, or None when the ranks could not make one (never retried).
_workspaces: dict[str, AllReduceWorkspace | None] = {}
_lock = threading.Lock()
_warned_capture: set[str] = set()


def flag_bytes() -> int:
    return int(torch.ops.vllm_fusion.all_reduce_flag_bytes())


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def _allocate(device_group: dist.ProcessGroup, capacity: int,
              device: torch.device) -> torch.Tensor:
    """This rank's symmetric buffer, flags zeroed (local: no collective yet)."""
    import torch.distributed._symmetric_memory as symm_mem

    group_name = device_group.group_name
    enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
    if enable is not None and not symm_mem.is_symm_mem_enabled_for_group(group_name):
        # Deprecated in torch 2.11 (rendezvous would resolve the group itself) but still
        # registers the group's store: kept, as measured, without its warning.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            enable(group_name)
    flags = flag_bytes()
    buffer = symm_mem.empty(flags + 4 * capacity, dtype=torch.uint8, device=device)
    buffer[:flags].zero_()
    # Zeroed before this rank joins: peers signal only after the rendezvous.
    torch.cuda.synchronize(device)
    return buffer


def _map_peers(buffer: torch.Tensor, device_group: dist.ProcessGroup,
               capacity: int) -> AllReduceWorkspace:
    """The rendezvous (collective): every rank's buffer mapped into this process."""
    import torch.distributed._symmetric_memory as symm_mem

    handle = symm_mem.rendezvous(buffer, device_group.group_name)
    return AllReduceWorkspace(
        buffer=buffer,
        handle=handle,
        buffers=[int(p) for p in handle.buffer_ptrs],
        counter=torch.zeros(2, dtype=torch.int64, device=buffer.device),
        rank=dist.get_rank(device_group),
        world_size=dist.get_world_size(device_group),
        capacity=capacity,
    )


def _all_ranks_agree(ok: bool, cpu_group: dist.ProcessGroup | None,
                     device_group: dist.ProcessGroup, device: torch.device) -> bool:
    """Whether every rank of the group succeeded (a MIN all-reduce of the outcome)."""
    if cpu_group is not None:
        flag = torch.tensor([int(ok)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=cpu_group)
    else:
        flag = torch.tensor([int(ok)], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=device_group)
    return bool(flag.item())


def _make(device_group, capacity, device,
          cpu_group) -> tuple[AllReduceWorkspace | None, str]:
    """(workspace or None, why not). Allocation, then the rendezvous, each entered only once
    every rank managed the step before: a rank that cannot allocate never leaves the others
    waiting in a collective."""
    buffer, workspace, error = None, None, "failed on another rank"
    try:
        buffer = _allocate(device_group, capacity, device)
    except Exception as e:  # reported by the caller, after the ranks agree
        error = f"{type(e).__name__}: {e}"
    if not _all_ranks_agree(buffer is not None, cpu_group, device_group, device):
        return None, error
    try:
        workspace = _map_peers(buffer, device_group, capacity)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    if not _all_ranks_agree(workspace is not None, cpu_group, device_group, device):
        return None, error
    return workspace, ""


def get_workspace(key: str, device_group: dist.ProcessGroup, capacity: int,
                  device: torch.device,
                  cpu_group: dist.ProcessGroup | None = None) -> AllReduceWorkspace | None:
    """The group's workspace, made on first use (collective: every rank must call it then).

    ``capacity`` only matters to the first call; None means the group has none (creation
    failed on some rank, and was logged once)."""
    with _lock:
        if key in _workspaces:
            return _workspaces[key]
        if torch.cuda.is_current_stream_capturing():
            # Allocation and the rendezvous cannot run inside CUDA graph capture.
            if key not in _warned_capture:
                _warned_capture.add(key)
                logger.warning(
                    "vllm_fusion: the fused all-reduce of group %s was first called during "
                    "CUDA graph capture; that graph runs the unfused all-reduce", key)
            return None
        capacity = _round_up(max(capacity, 16), 16)
        workspace, error = _make(device_group, capacity, device, cpu_group)
        if workspace is None:
            logger.warning(
                "vllm_fusion: could not set up the fused all-reduce workspace of group %s "
                "(%s); running the unfused all-reduce + RMSNorm there", key, error)
        else:
            logger.info(
                "vllm_fusion: fused all-reduce workspace for group %s: %d ranks, %.1f MiB "
                "per message", key, workspace.world_size, capacity / 2**20)
        _workspaces[key] = workspace
        return workspace


def release_workspaces() -> None:
    """Frees every workspace (at interpreter exit, and for tests)."""
    with _lock:
        _workspaces.clear()


atexit.register(release_workspaces)
