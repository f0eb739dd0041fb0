"""Build models without allocating their weights: parameters land on the meta device (or any device).

Two thread-local mechanisms, nothing patched: torch's own device context (``with torch.device(...)``,
a TorchFunctionMode) routes tensor factories to the target device when buffers should go there too, and
a module parameter-registration hook (installed while any thread is inside the context, and a no-op for
threads that are not) moves each parameter to the target device as its module registers it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_parameter_registration_hook,
)
from torch.nn.parameter import UninitializedParameter
from torch.utils.hooks import RemovableHandle

_local = threading.local()
_lock = threading.Lock()
_handles: list[RemovableHandle] = []
_users = 0


def _target() -> tuple[torch.device, bool] | None:
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else None


def _on_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
    target = _target()
    if target is None or param is None or param.device == target[0]:
        return None
    if isinstance(param, UninitializedParameter):
        return None  # lazy modules create their parameters on first forward
    return nn.Parameter(param.detach().to(target[0]), requires_grad=param.requires_grad)


def _on_buffer(module: nn.Module, name: str, buffer: torch.Tensor | None) -> torch.Tensor | None:
    target = _target()
    if target is None or not target[1] or buffer is None or buffer.device == target[0]:
        return None
    return buffer.to(target[0])


def _acquire() -> None:
    global _users
    with _lock:
        if _users == 0:
            # torch documents these hooks as "-> None or new parameter/buffer"; its annotation says None
            _handles.append(register_module_parameter_registration_hook(_on_parameter))  # type: ignore[arg-type]
            _handles.append(register_module_buffer_registration_hook(_on_buffer))  # type: ignore[arg-type]
        _users += 1


def _release() -> None:
    global _users
    with _lock:
        _users -= 1
        if _users == 0:
            while _handles:
                _handles.pop().remove()


@contextlib.contextmanager
def init_on_device(device: torch.device | str | int, *, include_buffers: bool = True) -> Iterator[None]:
    """Build modules with their parameters (and, by default, buffers) directly on ``device``.

    Affects only the current thread. ``device`` may be a GPU index, "cuda:1", "cpu" or "meta".
    Example::

        with init_on_device("cuda:0"):
            model = MyModel()  # no round trip through CPU memory
    """
    target = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    _acquire()
    stack = _local.__dict__.setdefault("stack", [])
    stack.append((target, include_buffers))
    try:
        with torch.device(target) if include_buffers else contextlib.nullcontext():
            yield
    finally:
        stack.pop()
        _release()


def init_empty_weights(include_buffers: bool = False) -> contextlib.AbstractContextManager[None]:
    """Build a model of any size without allocating its weights: parameters go to the meta device.

    Buffers stay real on the CPU (so computed buffers such as rotary frequencies keep their values)
    unless ``include_buffers=True``. Load weights afterwards with `load_checkpoint_and_dispatch`.
    Thread-safe: other threads build real modules meanwhile. Example::

        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)  # instant, no RAM used
        model.lm_head.weight.device  # device(type='meta')
    """
    return init_on_device("meta", include_buffers=include_buffers)
