"""Big-model inference end to end: checkpoints in every layout, dispatch, CPU and disk offload, HF models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from distrib import (
    cpu_offload,
    disk_offload,
    dispatch_model,
    infer_auto_device_map,
    init_empty_weights,
    load_checkpoint_and_dispatch,
    load_checkpoint_in_model,
    remove_hooks,
)
from distrib.big_modeling._dispatch import HOOK_ATTR
from distrib.big_modeling._offload import OffloadFolder
from distrib.errors import CheckpointError, DeviceMapError, DistribWarning
from tests._support.big_model import (
    DISK_MAP,
    _copy,
    empty_net,
    run,
    save_sharded,
    state_without_ties,
)

# --- loading ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["single", "sharded", "bin"])
def test_every_checkpoint_layout_loads_exactly(layout, checkpoints, reference):
    model = empty_net()
    report = load_checkpoint_in_model(model, checkpoints[layout])
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert model.head.weight is model.embed.weight
    for name, tensor in reference[0].state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert torch.equal(run(model, reference[1]), reference[2])


def test_a_disk_offloaded_model_gives_bit_identical_outputs(checkpoints, reference, tmp_path):
    model = load_checkpoint_and_dispatch(
        empty_net(), checkpoints["sharded"], device_map=DISK_MAP, offload_folder=tmp_path
    )
    assert model.blocks[1].up.weight.is_meta  # offloaded: nothing in RAM between forwards
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["blocks.1.up.weight"]["safetensors_file"].endswith(".safetensors")  # read in place
    assert not list(tmp_path.glob("*.dat"))  # no second copy of a safetensors checkpoint
    assert torch.equal(run(model, reference[1]), reference[2])
    assert torch.equal(run(model, reference[1]), reference[2])  # weights were released and re-read
    assert model.blocks[2].down.weight.is_meta
    assert model.head.weight is model.embed.weight


def test_a_tensor_entry_on_disk_is_loaded_by_the_module_that_holds_it(checkpoints, reference, tmp_path):
    device_map = {**DISK_MAP, "scale": "disk"}  # a buffer of the model itself, not of a child
    model = load_checkpoint_and_dispatch(
        empty_net(), checkpoints["bin"], device_map=device_map, offload_folder=tmp_path, offload_buffers=True
    )
    assert model.scale.is_meta
    assert (tmp_path / "blocks.1.up.weight.dat").stat().st_size == 64 * 32 * 4  # a .bin is copied out
    assert torch.equal(run(model, reference[1]), reference[2])


def test_auto_device_map_with_a_small_budget_offloads_to_disk(checkpoints, reference, tmp_path):
    model = load_checkpoint_and_dispatch(
        empty_net(),
        checkpoints["single"],
        max_memory={"cpu": 30_000},
        no_split_module_classes=["Block"],
        offload_folder=tmp_path,
    )
    placed = [module.__dict__[HOOK_ATTR] for module in model.modules() if HOOK_ATTR in module.__dict__]
    assert any(state.unit is not None for state in placed)
    assert json.loads((tmp_path / "index.json").read_text())
    assert torch.equal(run(model, reference[1]), reference[2])


def test_dtype_is_converted_on_load(checkpoints, reference, tmp_path):
    model = load_checkpoint_and_dispatch(
        empty_net(), checkpoints["single"], device_map=DISK_MAP, offload_folder=tmp_path, dtype=torch.bfloat16
    )
    assert model.embed.weight.dtype == torch.bfloat16 and model.scale.dtype == torch.bfloat16
    assert json.loads((tmp_path / "index.json").read_text())["blocks.1.up.weight"]["dtype"] == "bfloat16"
    expected = run(_copy(reference[0]).to(torch.bfloat16), reference[1])
    assert torch.equal(run(model, reference[1]), expected)


def test_model_dtype_wins_when_no_dtype_is_given(reference, tmp_path):
    save_file(
        {k: v.to(torch.float16) for k, v in state_without_ties(reference[0]).items()},
        tmp_path / "half.safetensors",
    )
    model = empty_net()
    load_checkpoint_in_model(model, tmp_path / "half.safetensors")
    assert model.blocks[0].up.weight.dtype == torch.float32
    assert torch.equal(model.blocks[0].up.weight, reference[0].blocks[0].up.weight.half().float())


# --- checkpoint errors -----------------------------------------------------------------------------------


def test_missing_and_unexpected_keys_are_listed(reference, tmp_path):
    state = state_without_ties(reference[0])
    del state["blocks.2.up.bias"]
    state["blocks.9.extra"] = torch.zeros(1)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(
        CheckpointError, match=r"1 missing .*'blocks\.2\.up\.bias'.*1 unexpected .*'blocks\.9\.extra'"
    ):
        load_checkpoint_in_model(empty_net(), tmp_path / "bad.safetensors")
    report = load_checkpoint_in_model(empty_net(), tmp_path / "bad.safetensors", strict=False)
    assert report.missing_keys == ["blocks.2.up.bias"] and report.unexpected_keys == ["blocks.9.extra"]


def test_shards_missing_from_the_folder_are_named(reference, tmp_path):
    save_sharded(state_without_ties(reference[0]), tmp_path)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing from .*'model-00002-of-00003\.safetensors'"):
        load_checkpoint_in_model(empty_net(), tmp_path)


def test_shards_the_index_does_not_list_are_pointed_out(reference, tmp_path):
    save_sharded(state_without_ties(reference[0]), tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not v.startswith("model-00003")}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError, match=r"missing .*index does not list \(\['model-00003-of-00003\.safetensors'\]"
    ):
        load_checkpoint_in_model(empty_net(), tmp_path)


def test_a_shape_mismatch_names_the_tensor(reference, tmp_path):
    state = state_without_ties(reference[0])
    state["blocks.0.up.weight"] = torch.zeros(3, 3)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(
        CheckpointError, match=r"'blocks\.0\.up\.weight' has shape \(3, 3\) but the model's has \(64, 32\)"
    ):
        load_checkpoint_in_model(empty_net(), tmp_path / "bad.safetensors")


def test_unreadable_checkpoint_paths_are_explained(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint_in_model(empty_net(), tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="found no checkpoint in folder"):
        load_checkpoint_in_model(empty_net(), tmp_path)
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a format"):
        load_checkpoint_in_model(empty_net(), tmp_path / "weights.npz")


# --- device map and dispatch errors ---------------------------------------------------------------------


def test_disk_without_a_folder_and_too_little_memory_name_the_fix(checkpoints):
    with pytest.raises(DeviceMapError, match="offload_folder"):
        load_checkpoint_and_dispatch(empty_net(), checkpoints["single"], device_map=DISK_MAP)
    with pytest.raises(DeviceMapError, match=r"needs .* at least .* more is needed.*offload_folder"):
        load_checkpoint_and_dispatch(empty_net(), checkpoints["single"], max_memory={"cpu": "10KB"})


def test_an_incomplete_device_map_names_the_unassigned_modules(checkpoints):
    with pytest.raises(DeviceMapError, match=r"unassigned: \['blocks\.3', 'head'\]"):
        load_checkpoint_and_dispatch(
            empty_net(),
            checkpoints["single"],
            device_map={
                "embed": "cpu",
                "blocks.0": "cpu",
                "blocks.1": "cpu",
                "blocks.2": "cpu",
                "scale": "cpu",
            },
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error seen without GPUs")
def test_loading_onto_a_gpu_that_is_not_there_names_the_fix(checkpoints):
    with pytest.raises(DeviceMapError, match=r"puts 'blocks' on GPU 0, but this process sees 0 CUDA"):
        load_checkpoint_in_model(empty_net(), checkpoints["single"], device_map={"": "cpu", "blocks": 0})


def test_max_memory_with_an_explicit_map_is_ignored_with_a_warning(checkpoints):
    with pytest.warns(DistribWarning, match="ignored"):
        load_checkpoint_and_dispatch(
            empty_net(), checkpoints["single"], device_map={"": "cpu"}, max_memory={"cpu": 1}
        )


def test_dispatching_a_model_without_weights_is_an_error():
    with pytest.raises(DeviceMapError, match="meta device"):
        dispatch_model(empty_net(), {"": "cpu"})


def test_dispatching_twice_asks_for_remove_hooks_first(reference):
    model = cpu_offload(_copy(reference[0]))
    with pytest.raises(DeviceMapError, match="remove_hooks"):
        dispatch_model(model, {"": "cpu"})


# --- offload helpers, hooks and the disk format -----------------------------------------------------


def test_cpu_offload_on_a_cpu_machine_keeps_outputs(reference):
    model = cpu_offload(_copy(reference[0]))
    assert torch.equal(run(model, reference[1]), reference[2])


def test_disk_offload_and_remove_hooks_round_trip(reference, tmp_path):
    model = disk_offload(_copy(reference[0]), tmp_path)
    assert all(p.is_meta for p in model.parameters())
    assert torch.equal(run(model, reference[1]), reference[2])
    remove_hooks(model)
    assert not any(p.is_meta for p in model.parameters())
    assert not any(module._forward_pre_hooks or module._forward_hooks for module in model.modules())
    assert model.head.weight is model.embed.weight
    assert torch.equal(run(model, reference[1]), reference[2])


def test_an_offload_folder_is_reused_by_a_later_run(reference, tmp_path):
    disk_offload(_copy(reference[0]), tmp_path)
    fresh = dispatch_model(empty_net(), {"": "disk"}, offload_dir=tmp_path)  # nothing loaded: all from files
    assert torch.equal(run(fresh, reference[1]), reference[2])


def test_outputs_come_back_on_the_main_device_even_from_a_module_inside(reference, tmp_path):
    model = dispatch_model(_copy(reference[0]), DISK_MAP, offload_dir=tmp_path, main_device="cpu")
    hidden = model.blocks[1](torch.randn(2, 32))  # a disk block called on its own still works
    assert hidden.shape == (2, 32) and model.blocks[1].up.weight.is_meta


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(5, 3).to(torch.bfloat16),
        torch.randn(4).half(),
        torch.randn(2, 2, dtype=torch.complex64),
        torch.randint(-100, 100, (7,), dtype=torch.int8),
        torch.tensor([True, False, True]),
        torch.tensor(3.25, dtype=torch.float64),
        torch.empty(0, 4),
        torch.randn(3, 3).to(torch.float8_e4m3fn),
    ],
    ids=lambda t: str(t.dtype),
)
def test_the_disk_format_round_trips_every_dtype_bit_for_bit(tensor, tmp_path):
    folder = OffloadFolder(tmp_path)
    folder.save("w", tensor)
    folder.flush()
    loaded = OffloadFolder(tmp_path).load("w")  # a new folder object reads the index from disk
    assert loaded.dtype == tensor.dtype and loaded.shape == tensor.shape
    raw = tensor.reshape(-1).view(torch.uint8)
    assert torch.equal(loaded.reshape(-1).view(torch.uint8), raw)
    assert json.loads((tmp_path / "index.json").read_text())["w"]["dtype"] == str(tensor.dtype).removeprefix(
        "torch."
    )


def test_a_missing_offloaded_tensor_is_reported(tmp_path):
    with pytest.raises(CheckpointError, match="not in the offload folder"):
        OffloadFolder(tmp_path).load("head.weight")


# --- transformers ----------------------------------------------------------------------------------


def test_a_transformers_model_built_from_a_config_runs_offloaded(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(config).eval()
    state = {k: v for k, v in reference.state_dict().items() if k != "lm_head.weight"}  # tied
    (tmp_path / "ckpt").mkdir()
    save_sharded(state, tmp_path / "ckpt", num_shards=4)  # save_pretrained would import deepspeed
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    assert model.model.rotary_emb.inv_freq.device.type == "cpu"  # computed buffers stay real
    model.tie_weights()
    device_map = infer_auto_device_map(model, {"cpu": 120_000}, model._no_split_modules)
    assert set(device_map.values()) == {"cpu", "disk"}
    model = load_checkpoint_and_dispatch(
        model, tmp_path / "ckpt", device_map=device_map, offload_folder=tmp_path / "off"
    )
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
        generated = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False
        )
        expected = reference.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False
        )
    assert torch.equal(generated, expected)
    assert model.lm_head.weight is model.model.embed_tokens.weight

    with init_empty_weights():
        planned = transformers.AutoModelForCausalLM.from_config(config).eval()
    planned = load_checkpoint_and_dispatch(
        planned, tmp_path / "ckpt", max_memory={"cpu": 120_000}, offload_folder=tmp_path / "o2"
    )
    used = planned.__dict__[HOOK_ATTR].device_map
    assert used["model.layers.0"] == "cpu" and used["model.layers.1"] == "disk"
    assert not any(".layers.1." in name for name in used)  # _no_split_modules kept decoder layers whole
    with torch.no_grad():
        assert torch.equal(planned(ids).logits, reference(ids).logits)


# --- GPU ------------------------------------------------------------------------------------------------


# --- the example --------------------------------------------------------------------------------------
