"""Big-model inference, pure parts: meta-device init, sizes and budgets, device-map planning and checks."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from distrib import (
    compute_module_sizes,
    get_max_memory,
    infer_auto_device_map,
    init_empty_weights,
    init_on_device,
)
from distrib.big_modeling._placement import check_device_map, check_devices_exist
from distrib.errors import DeviceMapError

# Sizes in fp32 bytes: embed 1000, each block 2000 (two 1000-byte linears), norm 80, head 1000.
EMBED, BLOCK, NORM, HEAD = 1000, 2000, 80, 1000


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(25, 10, bias=False)
        self.b = nn.Linear(10, 25, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(torch.relu(self.a(x)))


class Toy(nn.Module):
    def __init__(self, num_blocks: int = 8, tied: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(25, 10)
        self.blocks = nn.ModuleList(Block() for _ in range(num_blocks))
        self.norm = nn.LayerNorm(10)
        self.head = nn.Linear(10, 25, bias=False)
        if tied:
            self.head.weight = self.embed.weight


def empty_toy(**kwargs: object) -> Toy:
    with init_empty_weights():
        return Toy(**kwargs)  # type: ignore[arg-type]


def bytes_on(model: nn.Module, device_map: dict, device: object) -> int:
    sizes = compute_module_sizes(model)
    return sum(sizes[name] for name, where in device_map.items() if where == device)


# --- init_empty_weights / init_on_device ---------------------------------------------------------------


class WithBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.register_buffer("freqs", torch.arange(4.0) * 2)
        self.register_buffer("ids", torch.arange(3), persistent=False)


def test_init_empty_weights_puts_parameters_on_meta_and_keeps_buffers_real():
    with init_empty_weights():
        model = WithBuffers()
    assert all(p.is_meta for p in model.parameters())
    assert isinstance(model.linear.weight, nn.Parameter) and model.linear.weight.requires_grad
    assert model.freqs.device.type == "cpu"
    assert torch.equal(model.freqs, torch.tensor([0.0, 2.0, 4.0, 6.0]))
    assert torch.equal(model.ids, torch.arange(3))


def test_init_empty_weights_with_buffers_puts_everything_on_meta():
    with init_empty_weights(include_buffers=True):
        model = WithBuffers()
        loose = torch.zeros(2)
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert loose.is_meta  # torch's device context: factories default to meta inside the block


def test_init_empty_weights_leaves_no_trace_after_the_block():
    with init_empty_weights():
        pass
    model = nn.Linear(3, 3)
    assert model.weight.device.type == "cpu"
    assert torch.count_nonzero(model.weight) > 0


def test_init_on_device_cpu_builds_real_modules():
    with init_on_device("cpu"):
        model = WithBuffers()
    assert all(t.device.type == "cpu" and not t.is_meta for t in model.state_dict().values())


def test_init_empty_weights_does_not_affect_other_threads():
    inside, built = threading.Event(), threading.Event()
    seen: dict[str, torch.device] = {}

    def empty_builder() -> None:
        with init_empty_weights():
            inside.set()
            built.wait(timeout=10)
            seen["empty"] = nn.Linear(2, 2).weight.device

    def real_builder() -> None:
        inside.wait(timeout=10)
        seen["real"] = nn.Linear(2, 2).weight.device
        built.set()

    threads = [threading.Thread(target=empty_builder), threading.Thread(target=real_builder)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert seen == {"empty": torch.device("meta"), "real": torch.device("cpu")}


def test_init_empty_weights_nests_and_restores():
    with init_empty_weights():
        with init_on_device("cpu", include_buffers=False):
            inner = nn.Linear(2, 2)
        outer = nn.Linear(2, 2)
    assert inner.weight.device.type == "cpu"
    assert outer.weight.is_meta


# --- sizes and budgets -----------------------------------------------------------------------------------


def test_compute_module_sizes_counts_tied_weights_once_and_honours_dtype():
    model = empty_toy(tied=True)
    sizes = compute_module_sizes(model)
    assert sizes["blocks.0"] == BLOCK
    assert sizes["embed"] == EMBED
    assert sizes["head"] == 0  # its weight is the embedding's
    assert sizes[""] == EMBED + 8 * BLOCK + NORM
    half = compute_module_sizes(model, dtype=torch.float16)
    assert half[""] == sizes[""] // 2
    assert half["blocks.3.a.weight"] == 500


def test_compute_module_sizes_keeps_integer_buffers_at_their_size():
    model = WithBuffers()
    sizes = compute_module_sizes(model, dtype="bf16")
    assert sizes["ids"] == 3 * 8
    assert sizes["freqs"] == 4 * 2


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("10GiB", 10 * 2**30),
        ("500MB", 500 * 10**6),
        ("1.5GB", 1_500_000_000),
        ("2 kib", 2048),
        ("1024", 1024),
        (4096, 4096),
    ],
)
def test_get_max_memory_parses_sizes(given, expected):
    assert get_max_memory({0: given}) == {0: expected}


@pytest.mark.parametrize("bad", ["10 gigs", "GiB", "-5MB", "1e9", -1, True])
def test_get_max_memory_rejects_sizes_that_do_not_parse(bad):
    with pytest.raises(DeviceMapError, match="10GiB"):
        get_max_memory({"cpu": bad})


def test_get_max_memory_orders_devices_and_normalizes_names():
    memory = get_max_memory({"disk": 5, "cpu": 4, "cuda:1": 2, 0: 1, torch.device("cuda", 2): 3})
    assert list(memory) == [0, 1, 2, "cpu", "disk"]
    assert memory == {0: 1, 1: 2, 2: 3, "cpu": 4, "disk": 5}


def test_get_max_memory_rejects_unknown_devices():
    with pytest.raises(DeviceMapError, match="not a device"):
        get_max_memory({"gpu0": "1GiB"})


def test_get_max_memory_measures_ram_when_not_given():
    memory = get_max_memory()
    assert memory["cpu"] > 0
    assert len([d for d in memory if isinstance(d, int)]) == torch.cuda.device_count()


# --- infer_auto_device_map ---------------------------------------------------------------------------


def test_a_model_that_fits_goes_whole_to_gpu_0():
    memory = {0: 10**6, 1: 10**6, "cpu": 10**6}
    assert infer_auto_device_map(empty_toy(), memory, ["Block"], strategy="sequential") == {"": 0}
    assert infer_auto_device_map(empty_toy(), {0: 10**6, "cpu": 10**6}, ["Block"]) == {"": 0}  # auto, 1 GPU
    assert set(infer_auto_device_map(empty_toy(), memory, ["Block"]).values()) == {0, 1}  # auto: balanced


def test_sequential_fills_gpus_then_cpu_keeping_room_for_the_largest_layer_on_gpu_0():
    model = empty_toy()
    device_map = infer_auto_device_map(
        model, {0: 7000, 1: 7000, "cpu": 10**6}, no_split_module_classes=["Block"], strategy="sequential"
    )
    assert device_map == {
        "embed": 0,
        "blocks.0": 0,
        "blocks.1": 0,  # 5000 bytes: GPU 0 keeps 2000 free for offloaded blocks streamed in
        "blocks.2": 1,
        "blocks.3": 1,
        "blocks.4": 1,
        "blocks.5": "cpu",
        "blocks.6": "cpu",
        "blocks.7": "cpu",
        "norm": "cpu",
        "head": "cpu",
    }
    assert bytes_on(model, device_map, 0) <= 7000 - BLOCK


@pytest.mark.parametrize("num_gpus", [2, 3, 4])
def test_balanced_spreads_the_model_evenly_over_fake_gpus(num_gpus):
    model = empty_toy()
    memory: dict[object, int] = {gpu: 10**5 for gpu in range(num_gpus)}
    device_map = infer_auto_device_map(model, {**memory, "cpu": 10**6}, ["Block"], strategy="balanced")
    loads = [bytes_on(model, device_map, gpu) for gpu in range(num_gpus)]
    total = compute_module_sizes(model)[""]
    assert sum(loads) == total
    assert max(loads) - min(loads) <= BLOCK + EMBED, loads
    assert device_map == infer_auto_device_map(model, {**memory, "cpu": 10**6}, ["Block"])  # "auto"


def test_balanced_on_four_fake_gpus_gives_each_two_blocks():
    model = empty_toy()
    device_map = infer_auto_device_map(
        model, {0: 10**4, 1: 10**4, 2: 10**4, 3: 10**4}, ["Block"], strategy="balanced"
    )
    blocks = [device_map[f"blocks.{i}"] for i in range(8)]
    assert blocks == [0, 0, 1, 1, 2, 2, 3, 3]
    assert device_map["embed"] == 0 and device_map["head"] == 3


def test_balanced_low_0_leaves_gpu_0_free_when_the_others_suffice():
    model = empty_toy()
    device_map = infer_auto_device_map(
        model, {0: 10**5, 1: 10**5, 2: 10**5}, ["Block"], strategy="balanced_low_0"
    )
    assert 0 not in device_map.values()
    loads = [bytes_on(model, device_map, gpu) for gpu in (1, 2)]
    assert abs(loads[0] - loads[1]) <= BLOCK + EMBED


def test_no_split_classes_are_never_split():
    model = empty_toy()
    memory = {0: 4500, 1: 10**5}
    split = infer_auto_device_map(model, memory, strategy="sequential")
    assert any(name.startswith("blocks.1.") for name in split)  # a block straddles the two GPUs
    whole = infer_auto_device_map(model, memory, no_split_module_classes=[Block], strategy="sequential")
    assert not any(name.count(".") > 1 for name in whole)
    assert whole["blocks.0"] == 0 and whole["blocks.1"] == 1


def test_the_model_itself_is_split_even_if_its_class_is_listed():
    model = nn.Sequential(nn.Sequential(nn.Linear(10, 25)), nn.Sequential(nn.Linear(25, 10)))
    device_map = infer_auto_device_map(model, {0: 1200, 1: 1200}, no_split_module_classes=["Sequential"])
    assert device_map == {"0": 0, "1": 1}


def test_entries_of_a_split_module_merge_back_when_they_share_a_device():
    device_map = infer_auto_device_map(empty_toy(), {0: 1500, 1: 10**5}, ["Block"], strategy="sequential")
    assert device_map == {"embed": 0, "blocks": 1, "norm": 1, "head": 1}


def test_tied_parameters_stay_on_one_device():
    model = empty_toy(tied=True)
    device_map = infer_auto_device_map(
        model, {0: 6000, 1: 6000, "cpu": 10**5}, ["Block"], strategy="sequential"
    )
    assert device_map["head"] == device_map["embed"] == 0
    check_device_map(model, device_map)  # the plan passes its own validation


def test_dtype_makes_a_model_fit():
    model = empty_toy()
    memory = {0: 10_000, "cpu": 10**5}
    assert "cpu" in infer_auto_device_map(model, memory, ["Block"]).values()
    assert infer_auto_device_map(model, memory, ["Block"], dtype=torch.float16) == {"": 0}


def test_without_gpus_the_rest_goes_to_disk_and_ram_keeps_room_for_one_layer():
    model = empty_toy()
    device_map = infer_auto_device_map(model, {"cpu": 9000}, ["Block"])
    assert "disk" in device_map.values()
    assert bytes_on(model, device_map, "cpu") <= 9000 - BLOCK


def test_not_enough_memory_even_with_disk_says_how_much_is_missing():
    with pytest.raises(DeviceMapError, match=r"needs 17\.66 KiB .* at least .* more") as error:
        infer_auto_device_map(empty_toy(), {"cpu": 5000, "disk": 5000}, ["Block"])
    assert "offload_folder" in str(error.value)


def test_unknown_strategy_is_rejected():
    with pytest.raises(DeviceMapError, match="balanced_low_0"):
        infer_auto_device_map(empty_toy(), {"cpu": 10**6}, strategy="greedy")  # type: ignore[arg-type]


# --- device map checks -----------------------------------------------------------------------------------


def test_check_device_map_names_unassigned_modules():
    with pytest.raises(DeviceMapError, match=r"unassigned: \['norm', 'head'\]"):
        check_device_map(empty_toy(), {"embed": "cpu", "blocks": "cpu"})


def test_check_device_map_rejects_unknown_devices_and_names():
    with pytest.raises(DeviceMapError, match=r"device_map\['embed'\] = 'gpu' is not a device"):
        check_device_map(empty_toy(), {"": "cpu", "embed": "gpu"})
    with pytest.raises(DeviceMapError, match="model does not have"):
        check_device_map(empty_toy(), {"": "cpu", "decoder": "cpu"})


def test_check_device_map_rejects_tied_parameters_on_different_devices():
    with pytest.raises(DeviceMapError, match="tied parameters"):
        check_device_map(empty_toy(tied=True), {"": "cpu", "head": "disk"})


def test_check_device_map_accepts_torch_spellings():
    device_map = check_device_map(empty_toy(), {"": "cuda:1", "head": torch.device("cpu"), "norm": "cuda"})
    assert device_map == {"": 1, "head": "cpu", "norm": 0}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error seen without GPUs")
def test_a_gpu_the_process_cannot_see_is_an_error():
    with pytest.raises(DeviceMapError, match="sees 0 CUDA device"):
        check_devices_exist({"blocks": 0})
