"""Stream a checkpoint into a model built on the meta device, tensor by tensor, straight to its device."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ..errors import CheckpointError, DeviceMapError, DistribWarning
from ._checkpoint import Checkpoint, Shard, open_checkpoint
from ._device_map import STRATEGIES, NoSplitClasses, infer_auto_device_map
from ._dispatch import dispatch_model
from ._mapped import read_header
from ._memory import Device, get_max_memory, normalize_device, to_dtype, torch_device
from ._offload import OffloadFolder
from ._placement import (
    TensorSlot,
    check_device_map,
    check_devices_exist,
    group_by_tensor,
    replace_tensor,
    shorten,
    tensor_placements,
    tensor_slots,
)


class LoadReport(NamedTuple):
    """Keys the model expected but the checkpoint lacks, and keys the checkpoint has but the model lacks.

    Returned by `load_checkpoint_in_model`; with ``strict=True`` (the default) a mismatch raises instead.
    Example::

        report = load_checkpoint_in_model(model, "old-checkpoint.safetensors", strict=False)
        report.missing_keys  # ['head.bias']
    """

    missing_keys: list[str]
    unexpected_keys: list[str]


def _tie_weights(model: nn.Module) -> None:
    # transformers models tie their embeddings in `tie_weights()`; a model built on the meta device
    # may not be tied yet, and planning and loading must see the ties.
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()


def _compare(checkpoint: Checkpoint, groups: list[list[TensorSlot]]) -> tuple[LoadReport, dict[str, int]]:
    """The key mismatch, and which checkpoint key to read for each tied group (by group index)."""
    keys = checkpoint.keys()
    present = set(keys)
    names: set[str] = set()
    missing: list[str] = []
    to_read: dict[str, int] = {}
    for index, group in enumerate(groups):
        persistent = [slot.name for slot in group if slot.persistent]
        names.update(persistent)
        found = [name for name in persistent if name in present]
        if found:
            to_read[found[0]] = index
        else:
            missing += persistent
    unexpected = [key for key in keys if key not in names]
    return LoadReport(missing, unexpected), to_read


def _mismatch(checkpoint: Checkpoint, report: LoadReport) -> CheckpointError:
    parts = []
    if report.missing_keys:
        parts.append(
            f"{len(report.missing_keys)} missing (in the model only): {shorten(report.missing_keys)}"
        )
    if report.unexpected_keys:
        unexpected = report.unexpected_keys
        parts.append(f"{len(unexpected)} unexpected (in the checkpoint only): {shorten(unexpected)}")
    hint = ""
    if checkpoint.unlisted:
        hint = f"; the folder holds shard files its index does not list ({shorten(checkpoint.unlisted)}): regenerate the index"
    return CheckpointError(
        f"checkpoint {str(checkpoint.source)!r} does not match the model: {'; '.join(parts)}{hint}. Check "
        "that it was saved from this model class and config, or pass strict=False to load the keys that match"
    )


def _placements(model: nn.Module, device_map: Mapping[str, object] | None) -> dict[str, Device]:
    if device_map is not None:
        normalized = check_device_map(model, device_map)
        check_devices_exist(normalized)
        return tensor_placements(model, normalized)
    return {
        slot.name: "cpu" if slot.tensor.is_meta else normalize_device(slot.tensor.device, where=slot.name)
        for slot in tensor_slots(model)
    }


def _target_dtype(stored: torch.dtype, current: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if not stored.is_floating_point:
        return stored
    if dtype is not None:
        return dtype
    return current.dtype if current.is_floating_point() else stored


@dataclass
class _Loader:
    """Puts checkpoint tensors into the model, each straight to its device and dtype."""

    groups: list[list[TensorSlot]]
    to_read: dict[str, int]  # checkpoint key -> index of the tied group it fills
    placements: dict[str, Device]
    dtype: torch.dtype | None
    folder: OffloadFolder | None
    staging: OffloadFolder | None = None  # offload_state_dict: RAM copies wait here until the end
    staged: list[int] = field(default_factory=list)

    def group(self, key: str) -> tuple[list[TensorSlot], Device]:
        group = self.groups[self.to_read[key]]
        return group, self.placements[group[0].name]

    def load_shard(self, shard: Shard) -> None:
        keys = [key for key in shard.list_keys() if key in self.to_read]
        linked = self.link(shard, keys) if shard.is_safetensors and self.folder is not None else set()
        rest = [key for key in keys if key not in linked]
        # Tensors read from a file are views of its memory map; one kept in RAM would pin the pages that
        # other tensors of the shard touched on their way elsewhere, so copy it out in that case.
        own_copy = any(self.group(key)[1] != "cpu" for key in rest)
        for key, value in shard.tensors(set(rest)):
            self.load(key, value, own_copy=own_copy, mapped=shard.is_mapped)

    def link(self, shard: Shard, keys: list[str]) -> set[str]:
        """Disk tensors the shard holds in their final dtype: the offload folder points at the shard."""
        assert self.folder is not None
        header = read_header(shard.path)
        linked = set()
        for key in keys:
            group, device = self.group(key)
            extent = header.get(key)
            if device != "disk" or extent is None:
                continue
            _check_shape(key, extent.shape, group[0].tensor)
            if _target_dtype(extent.dtype, group[0].tensor, self.dtype) == extent.dtype:
                self.folder.link(group[0].name, shard.path, key, extent.dtype, group[0].tensor.shape)
                replace_tensor(group, self.folder.meta(group[0].name))
                linked.add(key)
        return linked

    def load(self, key: str, value: torch.Tensor, *, own_copy: bool, mapped: bool) -> None:
        group, device = self.group(key)
        _check_shape(key, tuple(value.shape), group[0].tensor)
        target = _target_dtype(value.dtype, group[0].tensor, self.dtype)
        if device == "disk":
            assert self.folder is not None
            self.folder.save(group[0].name, value.to(dtype=target))
            replace_tensor(group, self.folder.meta(group[0].name))
            return
        placed = value.to(device=torch_device(device), dtype=target)
        is_view = placed.untyped_storage().data_ptr() == value.untyped_storage().data_ptr()
        if own_copy and is_view:
            placed, is_view = placed.clone(), False
        if self.staging is not None and device == "cpu" and not (is_view and mapped):
            # offload_state_dict: this copy would sit in RAM while later shards are read; park it on disk
            self.staging.save(group[0].name, placed)
            replace_tensor(group, self.staging.meta(group[0].name))
            self.staged.append(self.to_read[key])
            return
        replace_tensor(group, placed)

    def unstage(self) -> None:
        """Bring the parked tensors back into RAM, one at a time."""
        assert self.staging is not None
        for index in self.staged:
            group = self.groups[index]
            replace_tensor(group, self.staging.load(group[0].name).clone())
        self.staged.clear()


def _check_shape(key: str, shape: tuple[int, ...], current: torch.Tensor) -> None:
    if tuple(shape) != tuple(current.shape):
        raise CheckpointError(
            f"checkpoint tensor {key!r} has shape {tuple(shape)} but the model's has "
            f"{tuple(current.shape)}; the checkpoint was saved from a different config"
        )


def load_checkpoint_in_model(
    model: nn.Module,
    checkpoint: str | os.PathLike[str],
    device_map: Mapping[str, object] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    strict: bool = True,
    offload_state_dict: bool = False,
) -> LoadReport:
    """Read ``checkpoint`` into ``model`` one tensor at a time, each straight to its device and dtype.

    ``checkpoint`` is a ``.safetensors`` file, a ``.bin``/``.pt`` file (legacy non-zip files too,
    always with ``weights_only=True``), an ``*.index.json`` file (transformers' ``weight_map`` layout or
    a flat ``{tensor: file}`` map) or a folder holding one. Each tensor goes to the device ``device_map``
    gives it (without a map: where the model's tensor is, or the CPU for meta tensors). "disk" tensors
    go to ``offload_folder``: as a link into the checkpoint when it is safetensors and the dtype does
    not change (nothing is copied), else as a copy. Floating-point tensors are converted to ``dtype``,
    or else to the model's dtype. Peak RAM stays near one shard plus what stays in RAM;
    ``offload_state_dict=True`` parks the tensors bound for RAM that are copies (converted, or read
    from a legacy file) in a temporary folder until every shard is read, so the two never add up. Tied
    parameters stay tied. With ``strict`` (the default) a key mismatch raises `CheckpointError` listing
    the keys; otherwise the report lists them. Installs no hooks (see `load_checkpoint_and_dispatch`).
    Example::

        with init_empty_weights():
            model = MyModel()
        load_checkpoint_in_model(model, "checkpoints/model.safetensors", dtype=torch.bfloat16)
    """
    dtype = to_dtype(dtype)
    _tie_weights(model)
    placements = _placements(model, device_map)
    folder = None
    if "disk" in placements.values():
        if offload_folder is None:
            raise DeviceMapError(
                "device_map puts tensors on 'disk'; pass offload_folder=<folder> to hold them"
            )
        folder = OffloadFolder(offload_folder)
    checkpoint_ = open_checkpoint(checkpoint)
    groups = group_by_tensor(tensor_slots(model))
    report, to_read = _compare(checkpoint_, groups)
    if strict and (report.missing_keys or report.unexpected_keys):
        raise _mismatch(checkpoint_, report)
    loader = _Loader(groups, to_read, placements, dtype, folder)
    with _staging_folder(offload_state_dict, offload_folder) as staging:
        loader.staging = staging
        for shard in checkpoint_.shards:
            loader.load_shard(shard)
        if staging is not None:
            loader.unstage()
    if folder is not None:
        folder.flush()
    return report


@contextlib.contextmanager
def _staging_folder(enabled: bool, near: str | os.PathLike[str] | None) -> Iterator[OffloadFolder | None]:
    if not enabled:
        yield None
        return
    parent = Path(near) if near is not None else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    path = tempfile.mkdtemp(prefix=".distrib-state-dict-", dir=parent)
    try:
        yield OffloadFolder(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _with_disk(
    max_memory: Mapping[object, int | str] | None, offload_folder: str | os.PathLike[str] | None
) -> dict[Device, int]:
    memory = get_max_memory(max_memory)
    if "disk" not in memory:
        if offload_folder is None:
            memory["disk"] = 0
        else:
            existing = Path(offload_folder).absolute()
            while not existing.exists():
                existing = existing.parent
            memory["disk"] = shutil.disk_usage(existing).free
    return memory


def load_checkpoint_and_dispatch(
    model: nn.Module,
    checkpoint: str | os.PathLike[str],
    device_map: str | Mapping[str, object] | None = "auto",
    max_memory: Mapping[object, int | str] | None = None,
    no_split_module_classes: NoSplitClasses | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    main_device: object = None,
    strict: bool = True,
    offload_buffers: bool = False,
    offload_state_dict: bool = False,
    preload_module_classes: Iterable[str | type] | None = None,
    fallback_allocation: bool = False,
) -> nn.Module:
    """Load a checkpoint into a meta-device model and dispatch it over GPUs, CPU and disk.

    ``device_map`` is a dict, ``None`` (load on the CPU, no hooks) or a strategy name for
    `infer_auto_device_map` ("auto", "balanced", "balanced_low_0", "sequential"), which then uses
    ``max_memory``, ``no_split_module_classes`` (default: the model's ``_no_split_modules``, as
    transformers models declare), ``dtype``, ``offload_buffers`` and ``fallback_allocation``; without
    ``offload_folder`` nothing goes to disk. Then `load_checkpoint_in_model` streams the weights in
    (``offload_state_dict`` is its option) and `dispatch_model` installs the hooks, loading modules of
    ``no_split_module_classes`` and ``preload_module_classes`` whole when they are offloaded. Disk
    layers of a safetensors checkpoint are read straight from its files (memory-mapped, no copy);
    ``model.hf_device_map`` holds the flat map used. Example::

        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
        model = load_checkpoint_and_dispatch(
            model, "llama-folder/", max_memory={0: "20GiB", "cpu": "30GiB"},
            no_split_module_classes=["LlamaDecoderLayer"], offload_folder="offload/", dtype=torch.bfloat16,
        )
    """
    _tie_weights(model)
    # transformers models name the blocks that must not be split (their residual adds span children)
    no_split = no_split_module_classes or getattr(model, "_no_split_modules", None)
    if isinstance(device_map, str):
        if device_map not in STRATEGIES:
            raise DeviceMapError(f"device_map={device_map!r} is not a dict, None, or one of {STRATEGIES}")
        memory: Mapping[object, int | str] = _with_disk(max_memory, offload_folder)  # type: ignore[assignment]
        device_map = infer_auto_device_map(
            model,
            memory,
            no_split,
            dtype,
            strategy=device_map,  # type: ignore[arg-type]
            offload_buffers=offload_buffers,
            fallback_allocation=fallback_allocation,
        )
    elif max_memory is not None or fallback_allocation:
        warnings.warn(
            "max_memory and fallback_allocation only shape an inferred device_map ('auto', ...); "
            "they are ignored with an explicit device_map",
            DistribWarning,
            stacklevel=2,
        )
    load_checkpoint_in_model(
        model,
        checkpoint,
        device_map,
        offload_folder,
        dtype,
        strict=strict,
        offload_state_dict=offload_state_dict,
    )
    if device_map is None:
        return model
    layers = [*(no_split or ()), *(preload_module_classes or ())]
    return dispatch_model(
        model,
        device_map,
        offload_dir=offload_folder,
        main_device=main_device,
        offload_buffers=offload_buffers,
        preload_module_classes=layers,
    )
