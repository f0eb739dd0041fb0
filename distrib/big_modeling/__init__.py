"""Big-model inference: build without weights, plan devices, stream checkpoints, offload to CPU or disk.

Typical use::

    from distrib import init_empty_weights, load_checkpoint_and_dispatch

    with init_empty_weights():
        model = MyModel(config)
    model = load_checkpoint_and_dispatch(
        model, "checkpoint-folder/", max_memory={0: "10GiB", "cpu": "20GiB"}, offload_folder="offload/"
    )
    outputs = model(inputs)

Modules: ``_init`` (meta-device construction), ``_memory`` (sizes and budgets), ``_placement``
(device-map checks, flat maps), ``_planner`` (one greedy planning pass), ``_device_map`` (the planner's
rules: streamed-layer room, balancing), ``_checkpoint`` (reading files), ``_mapped`` (zero-copy memory
maps, prefetching pages), ``_offload`` (disk format), ``_loading`` (streaming into the model),
``_streaming`` (offloaded layers and their prefetcher), ``_dispatch`` (hooks), ``_model_offload``
(whole-model offload for pipelines).
"""

from __future__ import annotations

from ._device_map import get_balanced_memory, infer_auto_device_map
from ._dispatch import cpu_offload, disk_offload, dispatch_model, remove_hooks
from ._init import init_empty_weights, init_on_device
from ._loading import LoadReport, load_checkpoint_and_dispatch, load_checkpoint_in_model
from ._memory import compute_module_sizes, get_max_memory
from ._model_offload import ModelOffloadHook, cpu_offload_with_hook

__all__ = [
    "LoadReport",
    "ModelOffloadHook",
    "compute_module_sizes",
    "cpu_offload",
    "cpu_offload_with_hook",
    "disk_offload",
    "dispatch_model",
    "get_balanced_memory",
    "get_max_memory",
    "infer_auto_device_map",
    "init_empty_weights",
    "init_on_device",
    "load_checkpoint_and_dispatch",
    "load_checkpoint_in_model",
    "remove_hooks",
]
