"""torch's rendezvous backends, wrapped so that every attempt of the worker group gets a new, empty store.

torch's elastic agent keeps one store for the whole job and, since torch 2.5, `env://` no longer gives
each restart attempt a namespace of its own, so after a restart a rank could read the gloo (or NCCL)
address a rank of the failed attempt left there and fail to connect, or hang. `FreshWorkerStore` below
says how the wrapper avoids that; `register_rendezvous_backends` makes the wrapped backends known to torch
as `distrib-static` and `distrib-c10d`.
"""

from __future__ import annotations

from typing import Any

# distrib's rendezvous backend names -> torch's backend each one wraps.
WRAPPED_BACKENDS = {"distrib-static": "static", "distrib-c10d": "c10d"}


class FreshWorkerStore:
    """A torch rendezvous handler, except that the workers of every attempt get a new, empty store.

    Why: torch's elastic agent hosts one TCPStore for the whole job and tells the workers to use it
    (`TORCHELASTIC_USE_AGENT_STORE=True`); `init_process_group("env://")` then keeps its keys there with no
    per-attempt prefix (torch <= 2.4 added `/worker/attempt_N`; 2.5 removed it, expecting a new store per
    attempt that the static and the c10d handler do not create). After `--max-restarts` restarts the group,
    the keys of the failed attempt are still there, among them each rank's gloo address, and a new rank
    that reads one before its peer has overwritten it connects to a process that is gone ("Gloo
    connectFullMesh failed ... Connection refused") or, across machines, to a rank of the old attempt
    that is still alive (both hang). The agent itself keeps using torch's store.

    How: after each rendezvous, the node with rank 0 starts a TCPStore server on a free port and publishes
    the port in the rendezvous store; every node hands that address to its workers (`MASTER_PORT`). The
    previous attempt's server stops when it is replaced (this machine's workers of that attempt are gone:
    the agent stops them before it rendezvouses again). The key is scoped to the attempt: the c10d
    handler's store is already per round; the static handler's is not, so the key carries this agent's
    own attempt number, which advances in step on every machine (static rendezvous restarts only after a
    failure). So with static rendezvous on several machines, a restarted machine waits here, up to
    --rdzv-timeout, until machine 0 has restarted too.
    """

    def __init__(self, inner: Any, backend: str) -> None:
        self._inner = inner
        self._backend = backend
        self._attempt = -1
        self._server: Any = None

    def get_backend(self) -> str:
        return self._backend

    @property
    def use_agent_store(self) -> bool:
        return bool(self._inner.use_agent_store)

    def next_rendezvous(self) -> Any:
        from torch.distributed import TCPStore
        from torch.distributed.elastic.rendezvous.api import (
            RendezvousInfo,
            RendezvousStoreInfo,
            RendezvousTimeoutError,
        )

        info = self._inner.next_rendezvous()
        self._attempt += 1
        if not self._inner.use_agent_store:  # rank 0's worker hosts a new store itself on every attempt
            return info
        key = "distrib.worker_store_port" + (
            f".{self._attempt}" if self._inner.get_backend() == "static" else ""
        )
        addr = info.bootstrap_store_info.master_addr
        if info.rank == 0:
            self._server = None  # the previous attempt's server stops first
            self._server = TCPStore(addr, 0, is_master=True, wait_for_workers=False, multi_tenant=False)
            info.store.set(key, str(self._server.port))
        try:
            port = int(info.store.get(key))
        except Exception as exc:  # DistStoreError after the store's timeout (static: --rdzv-timeout)
            raise RendezvousTimeoutError(
                f"machine rank 0 did not start attempt {self._attempt} of the worker group in time (it may "
                "still be running the failed attempt, or it stopped); see its output, or raise --rdzv-timeout."
            ) from exc
        return RendezvousInfo(info.store, info.rank, info.world_size, RendezvousStoreInfo(addr, port))

    def is_closed(self) -> bool:
        return bool(self._inner.is_closed())

    def set_closed(self) -> None:
        self._inner.set_closed()

    def num_nodes_waiting(self) -> int:
        return int(self._inner.num_nodes_waiting())

    def get_run_id(self) -> str:
        return str(self._inner.get_run_id())

    def shutdown(self) -> bool:
        self._server = None
        return bool(self._inner.shutdown())

    def __getattr__(self, name: str) -> Any:  # anything else a handler offers (settings, ...)
        return getattr(self._inner, name)


def _create_handler(params: Any) -> Any:
    """Rendezvous handler factory for the `WRAPPED_BACKENDS` (registered with torch's registry)."""
    from torch.distributed.elastic.rendezvous import RendezvousParameters, rendezvous_handler_registry

    inner = rendezvous_handler_registry.create_handler(
        RendezvousParameters(
            backend=WRAPPED_BACKENDS[params.backend],
            endpoint=params.endpoint,
            run_id=params.run_id,
            min_nodes=params.min_nodes,
            max_nodes=params.max_nodes,
            local_addr=params.local_addr,
            **params.config,
        )
    )
    return FreshWorkerStore(inner, params.backend)


def register_rendezvous_backends() -> None:
    """Make the `WRAPPED_BACKENDS` known to torch (idempotent)."""
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry

    for name in WRAPPED_BACKENDS:
        rendezvous_handler_registry.register(name, _create_handler)
