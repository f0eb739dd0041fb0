"""distrib: keep your PyTorch training loop; run it on one CPU, many processes, GPUs, machines or TPUs.

Public names are imported lazily, so `import distrib` costs little more than `import torch`. Example::

    from distrib import distributed, prepare, backward

    with distributed(mixed_precision="bf16") as ctx:
        model, optimizer, loader = prepare(model, optimizer, loader)
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            backward(loss)
            optimizer.step()
            optimizer.zero_grad()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

# public name -> private module that defines it
_EXPORTS: dict[str, str] = {
    # scope and runtime
    "distributed": "_scope",
    "distributed_main": "_scope",
    "current": "_runtime",
    "Runtime": "_runtime",
    "Settings": "_settings",
    "DDPOptions": "_options",
    "FSDPOptions": "_options",
    "CompileOptions": "_options",
    "DeepSpeedOptions": "_options",
    "XLAOptions": "_options",
    # N-D parallelism
    "ParallelismOptions": "_options",
    "PipelinedModel": "parallel._pipeline",
    "context_parallel": "parallel._context",
    # training
    "prepare": "_prepare",
    "unwrap_model": "_prepare",
    "backward": "_training",
    "accumulate": "_training",
    "no_sync": "_training",
    "trigger_sync_in_backward": "_training",
    "join_uneven_inputs": "_training",
    "clip_grad_norm_": "_training",
    "clip_grad_value_": "_training",
    "optimizer_step_was_skipped": "_training",
    "autocast": "_precision",
    # data
    "skip_first_batches": "_data.loader",
    "sample_generator": "_data.order",
    # collectives
    "gather": "_collectives",
    "gather_object": "_collectives",
    "gather_for_metrics": "_collectives",
    "pad_across_processes": "_collectives",
    "reduce": "_collectives",
    "broadcast": "_collectives",
    "broadcast_object_list": "_collectives",
    "wait_for_everyone": "_collectives",
    "split_between_processes": "_collectives",
    "set_trigger": "_collectives",
    "check_trigger": "_collectives",
    # process control
    "is_main_process": "_process",
    "is_local_main_process": "_process",
    "main_process_first": "_process",
    "local_main_process_first": "_process",
    "on_main_process": "_process",
    "on_local_main_process": "_process",
    "on_process": "_process",
    "on_last_process": "_process",
    "print": "_process",
    "set_seed": "_process",
    # big-model inference
    "init_empty_weights": "big_modeling",
    "init_on_device": "big_modeling",
    "compute_module_sizes": "big_modeling",
    "get_max_memory": "big_modeling",
    "infer_auto_device_map": "big_modeling",
    "load_checkpoint_in_model": "big_modeling",
    "load_checkpoint_and_dispatch": "big_modeling",
    "LoadReport": "big_modeling",
    "dispatch_model": "big_modeling",
    "cpu_offload": "big_modeling",
    "cpu_offload_with_hook": "big_modeling",
    "ModelOffloadHook": "big_modeling",
    "disk_offload": "big_modeling",
    "remove_hooks": "big_modeling",
    "get_balanced_memory": "big_modeling",
    # checkpoints
    "save_state": "checkpointing",
    "SaveHandle": "checkpointing",
    "load_state": "checkpointing",
    "save_model": "checkpointing",
    "get_state_dict": "checkpointing",
    "save": "checkpointing",
    "register_for_checkpointing": "checkpointing",
    "register_save_state_pre_hook": "checkpointing",
    "register_load_state_pre_hook": "checkpointing",
    # tracking, logging, progress, profiling
    "init_trackers": "_tracking",
    "log": "_tracking",
    "end_training": "_tracking",
    "get_tracker": "_tracking",
    "Tracker": "_tracking",
    "JSONLTracker": "_tracking",
    "TensorBoardTracker": "_tracking",
    "WandBTracker": "_tracking",
    "MLflowTracker": "_tracking",
    "CometTracker": "_tracking",
    "get_logger": "_logging",
    "progress_bar": "_progress",
    "profile": "_profiler",
    # launching from Python
    "notebook_launcher": "_launch.notebook",
    "debug_launcher": "_launch.notebook",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'distrib' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"distrib.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from ._collectives import (
        broadcast,
        broadcast_object_list,
        check_trigger,
        gather,
        gather_for_metrics,
        gather_object,
        pad_across_processes,
        reduce,
        set_trigger,
        split_between_processes,
        wait_for_everyone,
    )
    from ._data.loader import skip_first_batches
    from ._data.order import sample_generator
    from ._launch.notebook import debug_launcher, notebook_launcher
    from ._logging import get_logger
    from ._options import (
        CompileOptions,
        DDPOptions,
        DeepSpeedOptions,
        FSDPOptions,
        ParallelismOptions,
        XLAOptions,
    )
    from ._precision import autocast
    from ._prepare import prepare, unwrap_model
    from ._process import (
        is_local_main_process,
        is_main_process,
        local_main_process_first,
        main_process_first,
        on_last_process,
        on_local_main_process,
        on_main_process,
        on_process,
        print,
        set_seed,
    )
    from ._profiler import profile
    from ._progress import progress_bar
    from ._runtime import Runtime, current
    from ._scope import distributed, distributed_main
    from ._settings import Settings
    from ._tracking import (
        CometTracker,
        JSONLTracker,
        MLflowTracker,
        TensorBoardTracker,
        Tracker,
        WandBTracker,
        end_training,
        get_tracker,
        init_trackers,
        log,
    )
    from ._training import (
        accumulate,
        backward,
        clip_grad_norm_,
        clip_grad_value_,
        join_uneven_inputs,
        no_sync,
        optimizer_step_was_skipped,
        trigger_sync_in_backward,
    )
    from .big_modeling import (
        LoadReport,
        ModelOffloadHook,
        compute_module_sizes,
        cpu_offload,
        cpu_offload_with_hook,
        disk_offload,
        dispatch_model,
        get_balanced_memory,
        get_max_memory,
        infer_auto_device_map,
        init_empty_weights,
        init_on_device,
        load_checkpoint_and_dispatch,
        load_checkpoint_in_model,
        remove_hooks,
    )
    from .checkpointing import (
        SaveHandle,
        get_state_dict,
        load_state,
        register_for_checkpointing,
        register_load_state_pre_hook,
        register_save_state_pre_hook,
        save,
        save_model,
        save_state,
    )
    from .parallel._context import context_parallel
    from .parallel._pipeline import PipelinedModel
