"""Big-model inference with real transformers models saved by `save_pretrained` as sharded safetensors.

A causal LM (GPT-2) and a seq2seq model (T5), built from small configs, loaded with `init_empty_weights` +
`load_checkpoint_and_dispatch` on the CPU alone and on CPU + disk: `generate()` gives exactly the plain
model's tokens, `hf_device_map` is set and flat, disk layers are read in place from the checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from distrib import (
    compute_module_sizes,
    cpu_offload_with_hook,
    dispatch_model,
    init_empty_weights,
    load_checkpoint_and_dispatch,
    load_checkpoint_in_model,
    remove_hooks,
)
from distrib.big_modeling._dispatch import HOOK_ATTR
from distrib.big_modeling._placement import is_flat
from distrib.errors import CheckpointError, DeviceMapError

transformers = pytest.importorskip("transformers")

GENERATE = {"max_new_tokens": 6, "do_sample": False}


def gpt2_config():
    return transformers.GPT2Config(
        n_layer=4, n_embd=64, n_head=4, vocab_size=512, n_positions=64, bos_token_id=0, eos_token_id=1
    )


def t5_config():
    return transformers.T5Config(
        vocab_size=300, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0
    )


def saved(root: Path, name: str, model: nn.Module) -> Path:
    folder = root / name
    model.save_pretrained(folder, max_shard_size="100KB")
    assert len(list(folder.glob("*.safetensors"))) > 3  # really sharded
    return folder


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory):
    """Plain reference models, their sharded checkpoints, inputs and the tokens they generate."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    gpt2 = transformers.AutoModelForCausalLM.from_config(gpt2_config()).eval()
    t5 = transformers.AutoModelForSeq2SeqLM.from_config(t5_config()).eval()
    ids = torch.randint(2, 300, (2, 7))
    with torch.no_grad():
        expected = {
            "gpt2": gpt2.generate(ids, attention_mask=torch.ones_like(ids), **GENERATE),
            "t5": t5.generate(ids, attention_mask=torch.ones_like(ids), **GENERATE),
        }
    return {
        "checkpoint": {"gpt2": saved(root, "gpt2", gpt2), "t5": saved(root, "t5", t5)},
        "plain": {"gpt2": gpt2, "t5": t5},
        "ids": ids,
        "expected": expected,
    }


def empty(name: str) -> nn.Module:
    with init_empty_weights():
        if name == "gpt2":
            return transformers.AutoModelForCausalLM.from_config(gpt2_config()).eval()
        return transformers.AutoModelForSeq2SeqLM.from_config(t5_config()).eval()


def generate(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), **GENERATE)


@pytest.mark.parametrize("name", ["gpt2", "t5"])
@pytest.mark.parametrize("where", ["cpu", "cpu+disk", "disk"])
def test_generate_matches_the_plain_model(hf, tmp_path, name, where):
    model = empty(name)
    total = compute_module_sizes(model)[""]
    budget = {"cpu": 10 * total, "cpu+disk": total // 2, "disk": 1}[where]
    with pytest.warns() if where == "disk" else _no_warning():
        model = load_checkpoint_and_dispatch(
            model, hf["checkpoint"][name], max_memory={"cpu": budget}, offload_folder=tmp_path / "offload"
        )
    device_map = model.hf_device_map
    assert is_flat(device_map)
    assert set(device_map.values()) == {"cpu": {"cpu"}, "cpu+disk": {"cpu", "disk"}, "disk": {"disk"}}[where]
    assert torch.equal(generate(model, hf["ids"]), hf["expected"][name])
    if where != "cpu":
        index = json.loads((tmp_path / "offload" / "index.json").read_text())
        linked = {Path(entry["safetensors_file"]).parent for entry in index.values()}
        assert linked == {hf["checkpoint"][name].resolve()}  # read in place from the checkpoint's shards
        assert not list((tmp_path / "offload").glob("*.dat"))  # no second copy


class _no_warning:
    def __enter__(self) -> None:
        import warnings

        self.catcher = warnings.catch_warnings()
        self.catcher.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc: object) -> None:
        self.catcher.__exit__(*exc)


def private_copy(source: Path, folder: Path) -> Path:
    folder.mkdir()
    for file in source.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    return folder


def test_the_next_layer_is_prefetched_and_mapped_pages_are_released(hf, tmp_path):
    checkpoint = private_copy(hf["checkpoint"]["gpt2"], tmp_path / "checkpoint")  # mapped by this test only
    model = load_checkpoint_and_dispatch(
        empty("gpt2"), checkpoint, device_map={"": "disk"}, offload_folder=tmp_path / "offload"
    )
    assert torch.equal(generate(model, hf["ids"]), hf["expected"]["gpt2"])
    streamer = model.__dict__[HOOK_ATTR].streamer
    layers = [
        m for m in model.modules() if HOOK_ATTR in m.__dict__ and m.__dict__[HOOK_ATTR].unit is not None
    ]
    assert {type(m).__name__ for m in layers} >= {"GPT2Block", "Embedding"}  # blocks load whole
    assert streamer.hits > len(layers)  # after the first pass, layers found their weights read ahead
    streamer.close()
    folder = str(checkpoint.resolve())
    mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if folder in line]
    assert mapped == []  # no layer's pages stay mapped once it has run


def test_an_explicit_map_with_overrides_gives_a_flat_hf_device_map(hf, tmp_path):
    model = load_checkpoint_and_dispatch(
        empty("gpt2"),
        hf["checkpoint"]["gpt2"],
        device_map={"": "cpu", "transformer.h.1": "disk", "transformer.h.2": "disk"},
        offload_folder=tmp_path,
    )
    assert model.hf_device_map == {
        "transformer.wte": "cpu",
        "transformer.wpe": "cpu",
        "transformer.drop": "cpu",
        "transformer.h.0": "cpu",
        "transformer.h.1": "disk",
        "transformer.h.2": "disk",
        "transformer.h.3": "cpu",
        "transformer.ln_f": "cpu",
        "lm_head": "cpu",
    }
    assert torch.equal(generate(model, hf["ids"]), hf["expected"]["gpt2"])
    remove_hooks(model)
    assert not hasattr(model, "hf_device_map")
    assert not any(p.is_meta for p in model.parameters())  # copied out of the linked checkpoint shards
    assert torch.equal(generate(model, hf["ids"]), hf["expected"]["gpt2"])


def test_a_rewritten_checkpoint_is_refused_rather_than_read(hf, tmp_path):
    copy = private_copy(hf["checkpoint"]["gpt2"], tmp_path / "copy")
    model = load_checkpoint_and_dispatch(
        empty("gpt2"), copy, device_map={"": "disk"}, offload_folder=tmp_path / "o"
    )
    index = json.loads((tmp_path / "o" / "index.json").read_text())
    shard = Path(index["transformer.h.2.mlp.c_fc.weight"]["safetensors_file"])
    from safetensors.torch import load_file

    tensors = load_file(shard)
    save_file({k: v + 1 for k, v in tensors.items()}, shard)  # same names and shapes, new values
    with pytest.raises(CheckpointError, match="changed after the model was loaded"):
        generate(model, hf["ids"])


# --- options -------------------------------------------------------------------------------------------


class Reader(nn.Module):
    """Reads its child's weights directly instead of calling it."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.inner.weight, self.inner.bias)


class ReaderNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.reader = Reader()
        self.register_buffer("offset", torch.arange(8.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reader(self.first(x)) + self.offset


def reader_net() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model, x = ReaderNet().eval(), torch.randn(3, 8)
    with torch.no_grad():
        return model, x, model(x)


def test_preload_module_classes_lets_a_parent_read_its_childs_weights(tmp_path):
    model, x, expected = reader_net()
    dispatch_model(model, {"": "disk"}, offload_dir=tmp_path / "a")
    with pytest.raises(RuntimeError, match="meta") as error:
        model(x)
    if hasattr(error.value, "add_note"):  # Python >= 3.11: the error names the fix
        assert "preload_module_classes=['Reader']" in "\n".join(error.value.__notes__)
    remove_hooks(model)
    dispatch_model(model, {"": "disk"}, offload_dir=tmp_path / "b", preload_module_classes=["Reader"])
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert model.reader.inner.weight.is_meta  # dropped again after the forward


def test_preload_module_classes_must_be_class_names_or_classes(tmp_path):
    model, _, _ = reader_net()
    with pytest.raises(DeviceMapError, match="preload_module_classes holds 3"):
        dispatch_model(model, {"": "disk"}, offload_dir=tmp_path, preload_module_classes=[3])  # type: ignore[list-item]


def test_buffers_stay_on_the_main_device_unless_offload_buffers(tmp_path):
    model, x, expected = reader_net()
    dispatch_model(model, {"": "disk"}, offload_dir=tmp_path / "a", preload_module_classes=[Reader])
    assert not model.offset.is_meta and model.first.weight.is_meta
    assert not (tmp_path / "a" / "offset.dat").exists() and (tmp_path / "a" / "first.weight.dat").exists()
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    remove_hooks(model)
    dispatch_model(
        model, {"": "disk"}, offload_dir=tmp_path / "b", preload_module_classes=[Reader], offload_buffers=True
    )
    assert model.offset.is_meta
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_cpu_offload_with_hook_chains_models_and_offloads_on_request():
    first, x, expected = reader_net()
    second = nn.Linear(8, 2)
    with torch.no_grad():
        want = second(expected)
    first, hook_1 = cpu_offload_with_hook(first, "cpu")
    second, hook_2 = cpu_offload_with_hook(second, "cpu", prev_module_hook=hook_1)
    assert hook_2.prev_module_hook is hook_1 and hook_1.execution_device == torch.device("cpu")
    with torch.no_grad():
        assert torch.equal(second(first(x)), want)
    hook_2.offload()
    hook_2.remove()
    assert not second._forward_pre_hooks
    with pytest.raises(DeviceMapError, match="already has a cpu_offload_with_hook"):
        cpu_offload_with_hook(first, "cpu")
    with pytest.raises(DeviceMapError, match="cannot run a model"):
        cpu_offload_with_hook(nn.Linear(2, 2), "disk")
    with pytest.raises(DeviceMapError, match="prev_module_hook must be"):
        cpu_offload_with_hook(nn.Linear(2, 2), "cpu", prev_module_hook=object())  # type: ignore[arg-type]
    with init_empty_weights():
        empty_model = nn.Linear(2, 2)
    with pytest.raises(DeviceMapError, match="meta device"):
        cpu_offload_with_hook(empty_model, "cpu")


# --- checkpoint layouts ---------------------------------------------------------------------------------


def test_a_flat_index_under_any_name_loads(hf, tmp_path):
    source = hf["checkpoint"]["gpt2"]
    weight_map = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    for file in source.glob("*.safetensors"):
        (tmp_path / file.name).symlink_to(file)
    (tmp_path / "weights.index.json").write_text(json.dumps(weight_map))  # flat {tensor: file}
    for checkpoint in (tmp_path, tmp_path / "weights.index.json"):
        model = load_checkpoint_and_dispatch(empty("gpt2"), checkpoint, device_map={"": "cpu"})
        assert torch.equal(generate(model, hf["ids"]), hf["expected"]["gpt2"])


def test_a_malformed_index_is_named(tmp_path):
    (tmp_path / "weights.index.json").write_text(json.dumps({"a": 3}))
    with pytest.raises(CheckpointError, match="flat"):
        load_checkpoint_in_model(empty("gpt2"), tmp_path / "weights.index.json")
    (tmp_path / "weights.index.json").write_text(json.dumps({"a": "../elsewhere.safetensors"}))
    with pytest.raises(CheckpointError, match="outside the index's folder"):
        load_checkpoint_in_model(empty("gpt2"), tmp_path / "weights.index.json")


def test_a_legacy_bin_checkpoint_loads_without_mmap_and_without_unpickling(hf, tmp_path):
    plain = hf["plain"]["gpt2"]
    torch.save(plain.state_dict(), tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    model = load_checkpoint_and_dispatch(empty("gpt2"), tmp_path, device_map={"": "cpu"})
    assert torch.equal(generate(model, hf["ids"]), hf["expected"]["gpt2"])
    torch.save({"weight": Reader()}, tmp_path / "evil.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"cannot read .* as a torch checkpoint"):
        load_checkpoint_in_model(nn.Linear(8, 8), tmp_path / "evil.bin")


def test_offload_state_dict_parks_ram_copies_on_disk_until_the_end(hf, tmp_path):
    plain = hf["plain"]["gpt2"]
    torch.save(plain.state_dict(), tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    model = load_checkpoint_and_dispatch(
        empty("gpt2"),
        tmp_path / "pytorch_model.bin",
        device_map={"": "cpu", "transformer.h.3": "disk"},
        offload_folder=tmp_path / "offload",
        offload_state_dict=True,
    )
    assert not list((tmp_path / "offload").glob(".distrib-state-dict-*"))  # the parking folder is gone
    assert (tmp_path / "offload" / "transformer.h.3.mlp.c_fc.weight.dat").exists()  # a .bin is copied
    assert torch.equal(generate(model, hf["ids"]), hf["expected"]["gpt2"])


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="evicts a file from the page cache")
def test_reading_ahead_brings_evicted_pages_back_into_the_page_cache(tmp_path):
    import time

    from distrib.big_modeling._mapped import map_tensors, read_ahead_pages, read_header

    file = tmp_path / "layer.safetensors"
    save_file({"w": torch.randn(2_000_000)}, file)
    extent = read_header(file)["w"]
    with open(file, "rb") as handle:
        os.fsync(handle.fileno())
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages: dropped
    (tensor,) = map_tensors(file, [extent])
    start = tensor.data_ptr() // 4096 * 4096
    if read_ahead_pages.cached(start, start + 8 * 10**6):
        pytest.skip("the kernel kept the file's pages cached")
    read_ahead_pages([tensor])
    deadline = time.monotonic() + 30
    while not read_ahead_pages.cached(start, start + 8 * 10**6) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert read_ahead_pages.cached(start, start + 8 * 10**6)
    from safetensors.torch import load_file

    assert torch.equal(tensor, load_file(file)["w"])
