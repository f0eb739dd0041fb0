"""The device-map planner against maps written from its rules: budgets x models, flat maps, balancing, fallback.

Expected maps are built here from the rules (sizes from `compute_module_sizes`, never copied from a plan):
fill devices in model order; keep whole what no_split names; keep on the main device room for the largest
layer that is offloaded (and, with disk offload behind a GPU, the same on the CPU for the largest disk layer).
"""

from __future__ import annotations

import importlib.util
import itertools
import warnings

import pytest
import torch
from torch import nn

from distrib import compute_module_sizes, get_balanced_memory, infer_auto_device_map, init_empty_weights
from distrib.big_modeling._placement import flatten_device_map, is_flat, tensor_placements
from distrib.errors import DeviceMapError, DistribWarning

transformers = pytest.importorskip("transformers")

MB = 10**6


def gpt2(num_layers: int = 8) -> nn.Module:
    """GPT-2 small's widths with 8 blocks: 384 MB in fp32, an embedding tied with lm_head (154 MB)."""
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(n_layer=num_layers))
    model.tie_weights()
    return model


def t5() -> nn.Module:
    config = transformers.T5Config(d_model=256, d_ff=1024, num_layers=4, num_heads=4, vocab_size=32128)
    with init_empty_weights():
        model = transformers.AutoModelForSeq2SeqLM.from_config(config)
    model.tie_weights()
    return model


@pytest.fixture(scope="module")
def gpt2_model() -> nn.Module:
    return gpt2()


@pytest.fixture(scope="module")
def models(gpt2_model) -> dict[str, tuple[nn.Module, list[str]]]:
    return {"gpt2": (gpt2_model, ["GPT2Block"]), "t5": (t5(), ["T5Block"])}


def gpt2_expected(model: nn.Module, memory: dict[object, int]) -> dict[str, object]:
    """The plan the rules give GPT-2 (blocks kept whole) for a budget of one GPU and/or the CPU.

    Valid for budgets where, if anything is offloaded, a block is: then a block is the largest layer
    streamed, so the main device keeps a block's room, and so does the CPU behind a GPU when disk is used.
    """
    sizes = compute_module_sizes(model)
    block = sizes["transformer.h.0"]
    pieces = [("transformer.wte", sizes["transformer.wte"]), ("transformer.wpe", sizes["transformer.wpe"])]
    pieces += [("transformer.drop", 0), *((f"transformer.h.{i}", block) for i in range(8))]
    pieces.append(("transformer.ln_f", sizes["transformer.ln_f"]))
    main = next(iter(memory))
    if sizes[""] <= memory[main]:
        return {"": main}

    def fill(cpu_room: int) -> dict[str, object]:
        caps = {main: memory[main] - block}
        if main != "cpu" and "cpu" in memory:
            caps["cpu"] = memory["cpu"] - cpu_room
        order: list[object] = [*caps, "disk"]
        used = dict.fromkeys(order, 0)
        placement: dict[str, object] = {}
        index = 0
        for name, size in pieces:
            while order[index] != "disk" and used[order[index]] + size > caps[order[index]]:
                index += 1
            placement[name] = order[index]
            used[order[index]] += size
        return placement

    placement = fill(0)
    if "disk" in placement.values() and main != "cpu":
        placement = fill(block)
    if placement["transformer.wte"] == "disk":
        return {"": "disk"}  # the embedding is then the layer streamed, and everything follows it out
    placement["lm_head"] = placement["transformer.wte"]  # tied
    return flatten_device_map(model, placement)


@pytest.mark.parametrize("budget_mb", [100, 150, 190, 200, 250, 300, 340, 350, 380, 390, 1000])
def test_gpt2_on_a_cpu_budget_matches_the_rules(gpt2_model, budget_mb):
    memory: dict[object, int] = {"cpu": budget_mb * MB}
    if budget_mb * MB < compute_module_sizes(gpt2_model)["transformer.wte"]:
        with pytest.warns(DistribWarning, match="larger than their device's budget"):
            planned = infer_auto_device_map(gpt2_model, memory, ["GPT2Block"])
    else:
        planned = infer_auto_device_map(gpt2_model, memory, ["GPT2Block"])
    assert planned == gpt2_expected(gpt2_model, memory)
    assert is_flat(planned)


@pytest.mark.parametrize(
    ("gpu_mb", "cpu_mb"), [(250, 1000), (250, 100), (200, 200), (300, 60), (400, 100), (100, 1000)]
)
def test_gpt2_on_a_gpu_and_cpu_budget_matches_the_rules(gpt2_model, gpu_mb, cpu_mb):
    memory: dict[object, int] = {0: gpu_mb * MB, "cpu": cpu_mb * MB}
    planned = infer_auto_device_map(gpt2_model, memory, ["GPT2Block"])
    assert planned == gpt2_expected(gpt2_model, memory)


def test_the_issue_case_gpt2_at_300mb_keeps_the_embedding_and_four_blocks_in_ram(gpt2_model):
    planned = infer_auto_device_map(gpt2_model, {"cpu": "300MB"}, ["GPT2Block"])
    assert planned["transformer.wte"] == planned["lm_head"] == "cpu"
    in_ram = [i for i in range(8) if planned.get(f"transformer.h.{i}") == "cpu"]
    assert in_ram == [0, 1, 2, 3]
    sizes = compute_module_sizes(gpt2_model)
    resident = sum(sizes[name] for name, device in planned.items() if device == "cpu")
    assert resident + sizes["transformer.h.0"] <= 300 * MB  # room for one streamed block


def test_the_first_module_is_never_pushed_off_a_device_that_could_hold_it(gpt2_model):
    sizes = compute_module_sizes(gpt2_model)
    # exactly the embedding plus room for one streamed block: the embedding stays
    budget = sizes["transformer.wte"] + sizes["transformer.h.0"]
    planned = infer_auto_device_map(gpt2_model, {"cpu": budget}, ["GPT2Block"])
    assert planned["transformer.wte"] == "cpu"
    assert infer_auto_device_map(gpt2_model, {"cpu": budget - 1}, ["GPT2Block"]) == {"": "disk"}


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95, 1.0])
@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_every_plan_is_flat_and_honours_its_budget(models, name, fraction):
    model, no_split = models[name]
    sizes = compute_module_sizes(model)
    budget = int(sizes[""] * fraction)
    largest_anywhere = _largest_layer(model, "", no_split)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        planned = infer_auto_device_map(model, {"cpu": budget}, no_split)
    over = [w for w in caught if issubclass(w.category, DistribWarning)]
    if largest_anywhere > budget:  # cannot be honoured: said so
        assert (
            planned == {"": "disk"} and over and "larger than their device's budget" in str(over[0].message)
        )
        return
    assert not over
    assert is_flat(planned), planned
    placements = tensor_placements(model, planned)  # covers every tensor
    assert set(placements.values()) <= {"cpu", "disk"}
    resident = sum(sizes[n] for n, d in planned.items() if d == "cpu")
    on_disk = [n for n, d in planned.items() if d == "disk"]
    largest = max((_largest_layer(model, n, no_split) for n in on_disk), default=0)
    assert resident + largest <= budget
    for key in planned:  # never a child overriding its parent
        assert not any(other != key and key.startswith(other + ".") for other in planned)


def _largest_layer(model: nn.Module, entry: str, no_split: list[str]) -> int:
    full = {}
    for name, tensor in itertools.chain(
        model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)
    ):
        full[name] = tensor.numel() * tensor.element_size()
    module = model.get_submodule(entry)
    best = 0
    stack = [(entry, module)]
    while stack:
        name, current = stack.pop()
        whole = type(current).__name__ in no_split or not current._modules
        if whole:
            prefix = f"{name}." if name else ""
            best = max(best, sum(v for k, v in full.items() if k.startswith(prefix) or k == name))
        else:
            stack += [(f"{name}.{c}" if name else c, m) for c, m in current.named_children()]
    return best


def test_user_maps_with_overrides_are_flattened():
    model = gpt2(2)
    flat = flatten_device_map(model, {"": "cpu", "transformer.h.1": "disk", "lm_head": "cpu"})
    assert is_flat(flat)
    assert flat == {
        "transformer.wte": "cpu",
        "transformer.wpe": "cpu",
        "transformer.drop": "cpu",
        "transformer.h.0": "cpu",
        "transformer.h.1": "disk",
        "transformer.ln_f": "cpu",
        "lm_head": "cpu",
    }
    assert tensor_placements(model, flat) == tensor_placements(model, {"": "cpu", "transformer.h.1": "disk"})


# --- balanced plans ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_gpus", [2, 3, 4])
def test_balanced_equals_sequential_on_the_balanced_budget(gpt2_model, num_gpus):
    memory: dict[object, int] = {gpu: 10**9 for gpu in range(num_gpus)}
    memory["cpu"] = 10**10
    balanced = infer_auto_device_map(gpt2_model, memory, ["GPT2Block"], strategy="balanced")
    budget = get_balanced_memory(gpt2_model, memory, ["GPT2Block"])
    assert budget["cpu"] == memory["cpu"] and budget[num_gpus - 1] == memory[num_gpus - 1]
    assert all(budget[gpu] < memory[gpu] for gpu in range(num_gpus - 1))
    assert infer_auto_device_map(gpt2_model, budget, ["GPT2Block"], strategy="sequential") == balanced
    sizes = compute_module_sizes(gpt2_model)
    loads = [sum(sizes[n] for n, d in balanced.items() if d == gpu) for gpu in range(num_gpus)]
    assert sum(loads) == sizes[""]  # all on the GPUs
    # the first GPU holds the 154 MB embedding; the rest are within a block of the even share
    share = sizes[""] / num_gpus
    assert all(abs(load - share) <= sizes["transformer.wte"] for load in loads), loads


def test_balanced_low_0_keeps_gpu_0_empty_when_the_others_hold_the_model(gpt2_model):
    memory: dict[object, int] = {0: 10**9, 1: 10**9, 2: 10**9}
    planned = infer_auto_device_map(gpt2_model, memory, ["GPT2Block"], strategy="balanced_low_0")
    assert 0 not in planned.values() and {1, 2} <= set(planned.values())
    assert get_balanced_memory(gpt2_model, memory, ["GPT2Block"], low_zero=True)[0] == 0


def test_balanced_low_0_gives_gpu_0_only_what_the_others_cannot_hold(gpt2_model):
    sizes = compute_module_sizes(gpt2_model)
    others = sizes[""] - sizes["transformer.wte"]  # GPU 1 holds all but the embedding
    memory: dict[object, int] = {0: 10**9, 1: others, "cpu": 10**10}
    planned = infer_auto_device_map(gpt2_model, memory, ["GPT2Block"], strategy="balanced_low_0")
    on_0 = sum(sizes[n] for n, d in planned.items() if d == 0)
    assert on_0 == sizes["transformer.wte"]  # the first piece, in order: exactly what GPU 1 cannot hold
    assert "cpu" not in planned.values()


def test_get_balanced_memory_leaves_budgets_alone_when_the_model_does_not_fit(gpt2_model):
    memory: dict[object, int] = {0: 100 * MB, 1: 100 * MB, "cpu": 10**10}
    assert get_balanced_memory(gpt2_model, memory, ["GPT2Block"]) == memory
    assert get_balanced_memory(gpt2_model, {0: 10**9, "cpu": 10**10}) == {0: 10**9, "cpu": 10**10}


# --- fallback_allocation and offload_buffers ------------------------------------------------------------


def test_fallback_allocation_fills_a_device_the_in_order_rule_leaves_empty(gpt2_model):
    sizes = compute_module_sizes(gpt2_model)
    small = sizes["transformer.h.0"] // 2  # GPU 1 cannot take the next block, but ln_f would fit
    memory: dict[object, int] = {0: 250 * MB, 1: small, "cpu": 10**10}
    plain = infer_auto_device_map(gpt2_model, memory, ["GPT2Block"], strategy="sequential")
    assert 1 not in plain.values()
    fallback = infer_auto_device_map(
        gpt2_model, memory, ["GPT2Block"], strategy="sequential", fallback_allocation=True
    )
    on_gpu_1 = [name for name, device in fallback.items() if device == 1]
    assert on_gpu_1 == ["transformer.ln_f"]  # the first piece after the stopping point that fits
    assert {n: d for n, d in fallback.items() if d == 0} == {n: d for n, d in plain.items() if d == 0}
    assert is_flat(fallback) and tensor_placements(gpt2_model, fallback)


class WithBigBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(100, 100) for _ in range(6))
        for layer in self.layers:
            layer.register_buffer("table", torch.zeros(2500))  # 10 kB per layer


def test_buffers_of_offloaded_layers_count_on_the_main_device_unless_offloaded_too():
    with init_empty_weights(include_buffers=True):
        model = WithBigBuffers()
    layer = compute_module_sizes(model)["layers.0"]  # 40400 + 10000
    memory: dict[object, int] = {0: 3 * layer, "cpu": 10**8}
    kept = infer_auto_device_map(model, memory)
    streamed = infer_auto_device_map(model, memory, offload_buffers=True)
    on_gpu = [n for n, d in kept.items() if d == 0]
    assert len([n for n, d in streamed.items() if d == 0]) > len(on_gpu)


def test_a_budget_that_cannot_hold_the_model_says_how_much_is_missing(gpt2_model):
    with pytest.raises(DeviceMapError, match=r"at least .* more is needed"):
        infer_auto_device_map(gpt2_model, {"cpu": "100MB", "disk": "100MB"}, ["GPT2Block"])


# --- compared with Accelerate, where it is installed --------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="compares against Accelerate")
@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_plans_keep_at_least_as_much_on_fast_devices_as_accelerate(models, name, monkeypatch):
    import accelerate.utils.modeling as accelerate_modeling

    def budgets_as_given(max_memory=None):  # Accelerate drops GPUs this machine does not have
        from distrib import get_max_memory

        return get_max_memory(max_memory)

    monkeypatch.setattr(accelerate_modeling, "get_max_memory", budgets_as_given)
    model, no_split = models[name]
    total = compute_module_sizes(model)[""]
    budgets: list[dict[object, int]] = [{"cpu": int(total * f)} for f in (0.1, 0.3, 0.5, 0.7, 0.9)]
    budgets += [{0: int(total * g), "cpu": int(total * c)} for g in (0.2, 0.5) for c in (0.2, 0.6)]
    warnings.simplefilter("ignore", DistribWarning)  # tiny budgets: both stream layers over budget
    for memory in budgets:
        ours = infer_auto_device_map(model, memory, no_split, strategy="sequential")
        theirs = accelerate_modeling.infer_auto_device_map(
            model, dict(memory), no_split_module_classes=no_split
        )
        order = [*memory, "disk"]
        mine, peer = _prefix_bytes(model, ours, order), _prefix_bytes(model, dict(theirs), order)
        assert all(a >= b for a, b in zip(mine, peer)), (memory, mine, peer)


def _prefix_bytes(model: nn.Module, device_map: dict, order: list) -> list[int]:
    placements = tensor_placements(model, device_map)
    per: dict[object, int] = {}
    for name, param in model.named_parameters():
        per[placements[name]] = per.get(placements[name], 0) + param.numel() * param.element_size()
    return list(itertools.accumulate(per.get(device, 0) for device in order))
