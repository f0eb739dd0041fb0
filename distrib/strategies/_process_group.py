"""Process-group plumbing of the strategies that run on torch.distributed: device choice, backend, group."""

from __future__ import annotations

import datetime
import itertools
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from .._environment import ProcessEnvironment
    from .._settings import Settings


def choose_device(env: ProcessEnvironment, settings: Settings) -> torch.device:
    """CUDA by local rank, else MPS (one process), else CPU; `cpu=True` forces the CPU."""
    if not settings.cpu and torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    mps = getattr(torch.backends, "mps", None)
    if not settings.cpu and env.world_size == 1 and mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def choose_cuda_or_cpu(env: ProcessEnvironment, settings: Settings) -> torch.device:
    """CUDA by local rank when present, else the CPU: for backends that do not run on MPS."""
    if not settings.cpu and torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def collective_device(device: torch.device) -> torch.device:
    """Where collectives' tensors must live: CUDA tensors travel over NCCL, everything else over gloo (CPU)."""
    return device if device.type == "cuda" else torch.device("cpu")


def backend_for(device: torch.device) -> str:
    """nccl for CUDA (with gloo for CPU tensors), gloo otherwise."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


#: groups this process has created; part of each group's store prefix (see init_process_group)
_GROUPS_CREATED = itertools.count()
#: (address, port, rank, world size) -> the store rank 0 hosts for the whole job (launches without an agent)
_JOB_STORES: dict[tuple[str, int, int, int], dist.Store] = {}


def _job_store(env: ProcessEnvironment, timeout: datetime.timedelta) -> dist.Store:
    assert env.master_addr is not None and env.master_port is not None
    key = (env.master_addr, env.master_port, env.rank, env.world_size)
    if key not in _JOB_STORES:
        _JOB_STORES[key] = dist.TCPStore(
            env.master_addr,
            env.master_port,
            env.world_size,
            is_master=env.rank == 0,
            timeout=timeout,
            wait_for_workers=False,
        )
    return _JOB_STORES[key]


def init_process_group(env: ProcessEnvironment, settings: Settings, device: torch.device) -> bool:
    """Create the default process group unless one exists or the job has one process."""
    if env.world_size == 1 or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=settings.timeout)
    assert env.master_addr is not None and env.master_port is not None
    if env.agent_store:
        # torchrun's agent keeps one store at MASTER_ADDR:MASTER_PORT for the whole job, and env:// has not
        # given each group a key prefix of its own since torch 2.5: a second scope in the same process, or
        # the group of a restart attempt, would read the gloo addresses the previous group left there and
        # fail ("Gloo connectFullMesh failed ... Connection refused") or hang. So every group joins the
        # agent's store under a prefix of its own: the restart attempt (on one machine every worker of an
        # attempt has the same TORCHELASTIC_RESTART_COUNT; across machines the agents count restarts
        # separately, and `distrib launch` gives every attempt a new store, see _launch/executor.py) and the
        # number of groups this process created before (every rank opens its scopes in the same order).
        job_store: dist.Store = dist.TCPStore(
            env.master_addr, env.master_port, is_master=False, timeout=timeout
        )
        attempt = f"attempt_{env.restart_count}/" if env.num_nodes == 1 else ""
    else:
        # SLURM, MPI, hand-set variables: no launcher store, so rank 0 hosts one for the job and keeps it
        # for the process's lifetime. A store per group on the same port would race: a rank that opened
        # its next scope before rank 0 had torn the previous store down would read that store's stale keys
        # (and hang, or pair with the wrong peers). The groups share the job's store under their prefixes.
        job_store = _job_store(env, timeout)
        attempt = ""
    store = dist.PrefixStore(f"distrib/{attempt}group_{next(_GROUPS_CREATED)}", job_store)
    dist.init_process_group(
        backend=backend_for(device),
        store=store,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
    )
    if backend_for(device) == "gloo" and hasattr(torch._C, "_remove_obj_from_tls"):
        # For the scope's teardown (_scope.close_process_group): every collective gloo runs keeps a copy of
        # this thread's torch state, so an object put there now is released only once gloo has freed the
        # last collective this thread issued.

        class GroupMarker:
            pass

        torch._C._stash_obj_in_tls(GROUP_MARKER_KEY, GroupMarker())
    return True


#: key of the marker `init_process_group` puts in torch's thread-local state (see close_process_group)
GROUP_MARKER_KEY = "distrib.process_group"


def init_process_group_always(env: ProcessEnvironment, settings: Settings, device: torch.device) -> bool:
    """Like `init_process_group`, but one process gets a group too (FSDP and DeepSpeed need one).

    The one-process group lives in an in-memory store, so it needs no address or port.
    """
    if dist.is_initialized():
        return False
    if env.world_size > 1:
        return init_process_group(env, settings, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=backend_for(device),
        store=dist.HashStore(),
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=settings.timeout),
    )
    return True
