"""Run a model spread over devices: hooks move inputs to each part and stream offloaded weights in.

`dispatch_model` puts every tensor where the device map says. Parts on a GPU (or on the CPU when the CPU
is the main device) stay resident. Parts on "cpu" (with a GPU as main device) or on "disk" are
*offloaded*: the module holds an empty meta tensor, and a forward pre-hook loads the real weights onto
the main device just before the module runs; a forward post-hook drops them again. Inputs are moved to
the device each part runs on, and the model's outputs to the main device.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import DeviceMapError
from ._memory import Device, normalize_device, torch_device
from ._offload import OffloadFolder
from ._placement import (
    DeviceMap,
    TensorSlot,
    check_device_map,
    check_devices_exist,
    flatten_device_map,
    group_by_tensor,
    replace_tensor,
    shorten,
    tensor_placements,
    tensor_slots,
)
from ._planner import NoSplit
from ._streaming import FolderSource, Offloaded, RamSource, Source, Streamer, Unit

HOOK_ATTR = "_distrib_dispatch"
_CPU = torch.device("cpu")


def send_to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor in nested tuples, lists and dicts to ``device``; other objects pass unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device)
    if isinstance(obj, list):
        return [send_to_device(item, device) for item in obj]
    if isinstance(obj, tuple):
        items = [send_to_device(item, device) for item in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, dict):
        if type(obj) is dict:
            return {key: send_to_device(value, device) for key, value in obj.items()}
        moved = copy.copy(obj)  # keeps dict subclasses such as transformers' ModelOutput
        for key, value in obj.items():
            moved[key] = send_to_device(value, device)
        return moved
    return obj


@dataclass
class _ModuleHooks:
    """What one module does around its forward: load its layer's weights, move inputs, move outputs.

    Also what transformers finds as the module's ``_hf_hook``: its ``generate()`` sets
    ``io_same_device`` on an encoder's hook so the encoder's outputs come back where its inputs were.
    """

    execution_device: torch.device | None = None
    output_device: torch.device | None = None
    unit: Unit | None = None
    streamer: Streamer | None = None
    handles: list[RemovableHandle] = field(default_factory=list)
    depth: int = 0  # re-entrant calls load the weights once
    device_map: dict[str, Device] | None = None  # on the model itself: the map it was dispatched with
    io_same_device: bool = False
    input_device: torch.device | None = None

    def pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.unit is not None and self.depth == 0:
            assert self.streamer is not None
            self.streamer.enter(self.unit)
        self.depth += 1
        if self.io_same_device:
            self.input_device = _first_device((args, kwargs))
        if self.execution_device is None:
            return None
        return send_to_device((args, kwargs), self.execution_device)

    def post(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        self.depth = max(0, self.depth - 1)
        if self.unit is not None and self.depth == 0:
            assert self.streamer is not None
            self.streamer.leave(self.unit)
        if self.device_map is not None:  # the model itself: explain a failure the offloading caused
            _explain_meta_error(sys.exc_info()[1], module)
        target = self.input_device if self.io_same_device and self.input_device else self.output_device
        return None if target is None else send_to_device(output, target)

    def attach(self, module: nn.Module) -> None:
        self.handles.append(module.register_forward_pre_hook(self.pre, with_kwargs=True))
        self.handles.append(module.register_forward_hook(self.post, with_kwargs=True, always_call=True))
        module.__dict__[HOOK_ATTR] = self


def _explain_meta_error(error: BaseException | None, model: nn.Module) -> None:
    """A forward that read an offloaded child's weights directly met a meta tensor: name the fix."""
    if not isinstance(error, (RuntimeError, NotImplementedError)) or "meta" not in str(error):
        return
    if any("preload_module_classes" in note for note in getattr(error, "__notes__", ())):
        return
    culprit = None
    frame = error.__traceback__
    while frame is not None:  # the innermost forward() of a module of this model is the one that read
        owner = frame.tb_frame.f_locals.get("self") if frame.tb_frame.f_code.co_name == "forward" else None
        if isinstance(owner, nn.Module) and any(owner is m for m in model.modules()):
            culprit = owner
        frame = frame.tb_next
    name = type(culprit).__name__ if culprit is not None else "<the module whose forward failed>"
    add_note = getattr(error, "add_note", None)  # Python >= 3.11; older ones keep torch's message alone
    if add_note is None:
        return
    add_note(
        f"distrib: offloaded weights stay on the meta device except while their own module runs; {name}'s "
        f"forward seems to read a child's weights directly. Pass preload_module_classes=[{name!r}] to "
        "dispatch_model / load_checkpoint_and_dispatch so it loads everything below it first"
    )


def _first_device(obj: Any) -> torch.device | None:
    if isinstance(obj, torch.Tensor):
        return obj.device
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    for value in values:
        found = _first_device(value)
        if found is not None:
            return found
    return None


def _main_device(device_map: Mapping[str, Device], main_device: object) -> torch.device:
    if main_device is not None:
        device = normalize_device(main_device, where="main_device")
        check_devices_exist({"main_device": device})
        return torch_device(device)
    gpus = [d for d in device_map.values() if isinstance(d, int)]
    if gpus:
        return torch_device(min(gpus))
    others = [d for d in device_map.values() if d not in ("cpu", "disk")]
    return torch_device(others[0]) if others else _CPU


def _is_offloaded(device: Device, main: torch.device) -> bool:
    return device == "disk" or (device == "cpu" and main.type != "cpu")


def _runs_on(device: Device, main: torch.device) -> torch.device:
    """Where the layers placed on ``device`` run: offloaded ones on the main device."""
    return main if _is_offloaded(device, main) else torch_device(device)


def _offload(group: list[TensorSlot], device: Device, folder: OffloadFolder | None) -> Source | None:
    """Turn a tied group into an offloaded one; None when it holds no weights to offload."""
    name, tensor = group[0].name, group[0].tensor
    if device == "cpu":
        if tensor.is_meta:
            return None
        replace_tensor(group, tensor.detach().to("meta"))
        return RamSource(tensor.detach().to(_CPU))
    assert folder is not None
    if not tensor.is_meta:
        folder.save(name, tensor)
    elif name not in folder or folder.meta(name).shape != tensor.shape:
        return None
    replace_tensor(group, folder.meta(name))
    return FolderSource(folder, name)


@dataclass
class _Options:
    main: torch.device
    folder: OffloadFolder | None
    offload_buffers: bool
    layer_classes: NoSplit  # modules that load every offloaded tensor below them at once
    preload: NoSplit


def _resident(value: torch.Tensor, device: torch.device) -> torch.Tensor:
    placed = value.to(device)
    return placed.clone() if placed.data_ptr() == value.data_ptr() else placed


def _place(model: nn.Module, placements: dict[str, Device], options: _Options) -> list[Offloaded]:
    """Move resident tensors to their device and offload the rest; returns the offloaded slots."""
    offloaded: list[Offloaded] = []
    on_meta: list[str] = []
    for group in group_by_tensor(tensor_slots(model)):
        device = placements[group[0].name]
        tensor = group[0].tensor
        keep_buffer = not group[0].is_param and not options.offload_buffers
        if _is_offloaded(device, options.main) and keep_buffer and not tensor.is_meta:
            # buffers are small and read by the code around a layer: they stay on the main device
            replace_tensor(group, tensor.detach().to(options.main))
        elif _is_offloaded(device, options.main):
            source = _offload(group, device, options.folder)
            if source is None:
                on_meta.append(group[0].name)
            elif keep_buffer:  # a buffer only the offload folder holds: read it back once
                replace_tensor(group, _resident(source.restore(), options.main))
            else:
                offloaded += [Offloaded(slot, group[0].tensor, source) for slot in group]
        elif tensor.is_meta:
            on_meta.append(group[0].name)
        elif tensor.device != torch_device(device):
            replace_tensor(group, tensor.detach().to(torch_device(device)))
    if on_meta:
        raise DeviceMapError(
            f"these tensors hold no data (they are on the meta device): {shorten(on_meta)}; load weights "
            "first (load_checkpoint_and_dispatch does both), pass the offload_dir they were saved to, or "
            "build the model with init_empty_weights(include_buffers=False) so buffers stay real"
        )
    return offloaded


def _units(model: nn.Module, offloaded: list[Offloaded], options: _Options) -> dict[nn.Module, Unit]:
    """Group offloaded slots into layers: the outermost layer-class module above each, else its holder."""
    modules = dict(model.named_modules(remove_duplicate=False))
    units: dict[nn.Module, Unit] = {}
    for item in offloaded:
        holder = item.slot.name.rpartition(".")[0]
        parts = holder.split(".") if holder else []
        name = holder
        for depth in range(len(parts)):
            candidate = ".".join(parts[:depth])
            module = modules[candidate]
            # the model itself is never one layer: loading all of it at once would defeat offloading
            if module is not model and (
                options.preload.matches(module) or options.layer_classes.matches(module)
            ):
                name = candidate
                break
        units.setdefault(modules[name], Unit(name)).items.append(item)
    order = {name: index for index, name in enumerate(modules)}
    return dict(sorted(units.items(), key=lambda pair: order[pair[1].name]))


def _install(model: nn.Module, flat: DeviceMap, units: dict[nn.Module, Unit], main: torch.device) -> None:
    hooks: dict[nn.Module, _ModuleHooks] = {}
    modules = dict(model.named_modules(remove_duplicate=False))
    for name, device in flat.items():
        module = modules.get(name)
        if module is None:  # a tensor entry: hook the module that holds it
            module = modules[name.rpartition(".")[0]]
        hooks.setdefault(module, _ModuleHooks()).execution_device = _runs_on(device, main)
    streamer = Streamer(main, list(units.values()))
    for module, unit in units.items():
        state = hooks.setdefault(module, _ModuleHooks())
        state.unit, state.streamer, state.execution_device = unit, streamer, main
    root = hooks.setdefault(model, _ModuleHooks())
    root.output_device, root.device_map, root.streamer = main, dict(flat), root.streamer or streamer
    encoder = _encoder(model)
    if encoder is not None:
        encoder.__dict__["_hf_hook"] = hooks.setdefault(encoder, _ModuleHooks())
    for module, state in hooks.items():
        state.attach(module)
    model.__dict__["hf_device_map"] = dict(flat)  # what transformers reads (generate, pipelines)


def _encoder(model: nn.Module) -> nn.Module | None:
    """The encoder of a transformers encoder-decoder model, whose ``_hf_hook`` its generate() adjusts."""
    config = getattr(model, "config", None)
    get_encoder = getattr(model, "get_encoder", None)
    if not getattr(config, "is_encoder_decoder", False) or not callable(get_encoder):
        return None
    encoder = get_encoder()
    return encoder if isinstance(encoder, nn.Module) and encoder is not model else None


def dispatch_model(
    model: nn.Module,
    device_map: Mapping[str, object],
    offload_dir: str | os.PathLike[str] | None = None,
    main_device: object = None,
    *,
    offload_buffers: bool = False,
    preload_module_classes: Iterable[str | type] | None = None,
) -> nn.Module:
    """Place ``model`` according to ``device_map`` and hook it so that forward passes just work.

    Tensors on GPUs stay there; tensors mapped to "cpu" (with a GPU main device) or "disk" are
    offloaded and streamed to ``main_device`` right before their layer runs, then dropped; the next
    layer's pages are read ahead (asynchronously, by the kernel). Disk tensors are written to ``offload_dir``
    (or, if the module holds only meta tensors, read from an ``offload_dir`` written by an earlier run,
    which may link straight into safetensors checkpoint files). ``main_device`` defaults to the lowest
    GPU in the map, else the CPU; outputs are returned there.

    A layer is loaded whole when its module's class is in ``preload_module_classes`` or in the
    model's ``_no_split_modules`` (transformers decoder layers): use it for a module whose forward
    reads its children's weights directly. Otherwise each module loads the tensors it holds itself.
    Buffers of offloaded layers stay on the main device unless ``offload_buffers=True``. Sets
    ``model.hf_device_map`` to the flat form of ``device_map``. Inference only: undo with
    `remove_hooks`. Example::

        model = dispatch_model(model, {"embed": 0, "blocks": "cpu", "head": "disk"}, offload_dir="off/")
        logits = model(tokens)  # on cuda:0
    """
    if any(HOOK_ATTR in module.__dict__ for module in model.modules()):
        raise DeviceMapError(
            "this model is already dispatched; call remove_hooks(model) before dispatching again"
        )
    normalized = check_device_map(model, device_map)
    check_devices_exist(normalized)
    main = _main_device(normalized, main_device)
    placements = tensor_placements(model, normalized)
    folder = None
    if "disk" in placements.values():
        if offload_dir is None:
            disk = [name for name, device in normalized.items() if device == "disk"]
            raise DeviceMapError(
                f"device_map puts {shorten(disk)} on 'disk'; pass offload_dir=<folder> to hold them"
            )
        folder = OffloadFolder(offload_dir)
    layer_classes = NoSplit.of(getattr(model, "_no_split_modules", None) or ())
    options = _Options(
        main,
        folder,
        offload_buffers,
        layer_classes,
        NoSplit.of(preload_module_classes, "preload_module_classes"),
    )
    offloaded = _place(model, placements, options)
    if folder is not None:
        folder.flush()
    _install(model, flatten_device_map(model, normalized), _units(model, offloaded, options), main)
    return model


def cpu_offload(model: nn.Module, execution_device: object = None) -> nn.Module:
    """Keep all weights in RAM and stream each module's weights to ``execution_device`` as it runs.

    ``execution_device`` defaults to GPU 0 when CUDA is available; on a CPU-only machine the model
    simply stays on the CPU. Example::

        model = cpu_offload(model, execution_device=0)  # GPU memory: about one layer at a time
    """
    if execution_device is None:
        execution_device = 0 if torch.cuda.is_available() else "cpu"
    return dispatch_model(model, {"": "cpu"}, main_device=execution_device)


def disk_offload(
    model: nn.Module, offload_dir: str | os.PathLike[str], execution_device: object = None
) -> nn.Module:
    """Write all weights to ``offload_dir`` and read each module's weights back only while it runs.

    ``execution_device`` defaults to GPU 0 when CUDA is available, else the CPU. Example::

        model = disk_offload(model, "offload/")  # RAM: about one layer at a time
    """
    if execution_device is None:
        execution_device = 0 if torch.cuda.is_available() else "cpu"
    return dispatch_model(model, {"": "disk"}, offload_dir=offload_dir, main_device=execution_device)


def remove_hooks(model: nn.Module, *, materialize: bool = True) -> nn.Module:
    """Remove the hooks `dispatch_model` installed, leaving a plain module.

    With ``materialize=True`` (the default) every offloaded tensor is loaded back into RAM on the CPU
    (disk ones are copied out of their files); resident tensors stay on their devices. With
    ``materialize=False`` offloaded tensors stay on the meta device. ``model.hf_device_map`` is
    removed. Example::

        remove_hooks(model)
        model.to("cpu")  # an ordinary module again
    """
    restored: dict[int, torch.Tensor] = {}
    for module in model.modules():
        state = module.__dict__.pop(HOOK_ATTR, None)
        if state is None:
            continue
        module.__dict__.pop("_hf_hook", None)
        for handle in state.handles:
            handle.remove()
        if state.streamer is not None:
            state.streamer.close()
        for item in state.unit.items if materialize and state.unit is not None else ():
            value = restored.get(id(item.placeholder))
            if value is None:
                value = item.source.restore()
                if item.slot.is_param:
                    value = nn.Parameter(value, requires_grad=item.placeholder.requires_grad)
                restored[id(item.placeholder)] = value
            item.slot.put(value)
    model.__dict__.pop("hf_device_map", None)
    return model
