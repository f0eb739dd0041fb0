"""Model-by-model offload for pipelines of several models: `cpu_offload_with_hook`.

A pipeline (text encoder, then denoiser, then decoder) runs one model at a time, so only the running
model needs to be on the GPU. Each model waits on the CPU; its first forward moves it whole to the
execution device, where it stays, and (through ``prev_module_hook``) sends the previous model of the
chain back to the CPU. The user's `ModelOffloadHook.offload` sends the last one back.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import DeviceMapError
from ._dispatch import HOOK_ATTR, send_to_device
from ._memory import normalize_device, torch_device
from ._placement import check_devices_exist

OFFLOAD_HOOK_ATTR = "_distrib_model_offload"
_CPU = torch.device("cpu")


class ModelOffloadHook:
    """The handle `cpu_offload_with_hook` returns: ``offload()`` sends the model back to the CPU.

    ``remove()`` takes the hook off (the model stays where it is). Example::

        model, hook = cpu_offload_with_hook(model, execution_device=0)
        model(inputs)   # moved to cuda:0 on first use, and stays there
        hook.offload()  # back to the CPU
    """

    def __init__(
        self, model: nn.Module, device: torch.device, prev_module_hook: ModelOffloadHook | None
    ) -> None:
        self.model = model
        self.execution_device = device
        self.prev_module_hook = prev_module_hook
        self._handle: RemovableHandle | None = model.register_forward_pre_hook(self._pre, with_kwargs=True)
        model.__dict__[OFFLOAD_HOOK_ATTR] = self
        self.offload()

    def _pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.prev_module_hook is not None:
            self.prev_module_hook.offload()
        self.model.to(self.execution_device)
        return send_to_device((args, kwargs), self.execution_device)

    def offload(self) -> None:
        """Move the model's parameters and buffers back to the CPU (freeing the execution device)."""
        self.model.to(_CPU)
        if self.execution_device.type == "cuda":
            torch.cuda.empty_cache()

    def remove(self) -> None:
        """Take the hook off the model; the model stays on the device it is on now."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.model.__dict__.pop(OFFLOAD_HOOK_ATTR, None)


def cpu_offload_with_hook(
    model: nn.Module,
    execution_device: object = None,
    prev_module_hook: ModelOffloadHook | None = None,
) -> tuple[nn.Module, ModelOffloadHook]:
    """Keep ``model`` on the CPU until it runs, then move it whole to ``execution_device`` and leave it there.

    Made for pipelines that run several models one after another: chain the hooks with
    ``prev_module_hook`` so that each model, when it starts, sends the previous one back to the CPU,
    and call ``hook.offload()`` on the last one when done. Faster than `cpu_offload` (weights move once
    per pipeline call, not once per layer) at the cost of one whole model on the GPU at a time.
    ``execution_device`` defaults to GPU 0 when CUDA is available, else the CPU. Returns the model and
    its `ModelOffloadHook`. Example::

        encoder, hook_1 = cpu_offload_with_hook(encoder, 0)
        unet, hook_2 = cpu_offload_with_hook(unet, 0, prev_module_hook=hook_1)
        vae, hook_3 = cpu_offload_with_hook(vae, 0, prev_module_hook=hook_2)
        latents = unet(encoder(prompt))   # encoder goes back to the CPU when unet starts
        image = vae(latents)
        hook_3.offload()
    """
    if execution_device is None:
        execution_device = 0 if torch.cuda.is_available() else "cpu"
    device = normalize_device(execution_device, where="execution_device")
    if device == "disk":
        raise DeviceMapError(
            "execution_device='disk' cannot run a model; use a GPU index such as 0, or 'cpu'"
        )
    check_devices_exist({"execution_device": device})
    if prev_module_hook is not None and not isinstance(prev_module_hook, ModelOffloadHook):
        raise DeviceMapError(
            f"prev_module_hook must be the hook an earlier cpu_offload_with_hook returned, "
            f"got {type(prev_module_hook).__name__}"
        )
    if any(HOOK_ATTR in module.__dict__ for module in model.modules()):
        raise DeviceMapError(
            "this model is dispatched (its weights are placed per layer); cpu_offload_with_hook moves whole "
            "models: call remove_hooks(model) first"
        )
    if OFFLOAD_HOOK_ATTR in model.__dict__:
        raise DeviceMapError("this model already has a cpu_offload_with_hook hook; call hook.remove() first")
    if any(tensor.is_meta for tensor in (*model.parameters(), *model.buffers())):
        raise DeviceMapError(
            "the model has tensors on the meta device (no data); load its weights first, e.g. with "
            "load_checkpoint_in_model(model, checkpoint)"
        )
    return model, ModelOffloadHook(model, torch_device(device), prev_module_hook)
