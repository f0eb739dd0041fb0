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


def init_process_group(env: ProcessEnvironment, settings: Settings, device: torch.device) -> bool:
    """Create the default process group unless one exists or the job has one process."""
    if env.world_size == 1 or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=settings.timeout)
    store: dist.Store | None = None
    init_method: str | None = None
    if not env.agent_store:
        # SLURM, MPI, hand-set variables: no launcher store, so rank 0 hosts a new one for this group
        init_method = f"tcp://{env.master_addr}:{env.master_port}"
    else:
        # torchrun's agent keeps one store at MASTER_ADDR:MASTER_PORT for the whole job, and env:// has not
        # given each group a key prefix of its own since torch 2.5: a second scope in the same process, or
        # the group of a restart attempt, would read the gloo addresses the previous group left there and
        # fail ("Gloo connectFullMesh failed ... Connection refused") or hang. So every group joins the
        # agent's store under a prefix of its own: the restart attempt (on one machine every worker of an
        # attempt has the same TORCHELASTIC_RESTART_COUNT; across machines the agents count restarts
        # separately, and `distrib launch` gives every attempt a new store, see _launch/executor.py) and the
        # number of groups this process created before (every rank opens its scopes in the same order).
        assert env.master_addr is not None and env.master_port is not None
        agent_store = dist.TCPStore(env.master_addr, env.master_port, is_master=False, timeout=timeout)
        attempt = f"attempt_{env.restart_count}/" if env.num_nodes == 1 else ""
        store = dist.PrefixStore(f"distrib/{attempt}group_{next(_GROUPS_CREATED)}", agent_store)
    dist.init_process_group(
        backend=backend_for(device),
        init_method=init_method,
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
