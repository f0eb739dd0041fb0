"""Big-model inference with layers on a GPU: dispatch across GPU, CPU and disk, CPU offload streaming."""

from __future__ import annotations

import pytest
import torch

from distrib import (
    cpu_offload,
    load_checkpoint_and_dispatch,
)
from tests._support.big_model import DISK_MAP, _copy, empty_net, run


@pytest.mark.gpu
def test_gpu_layers_cpu_and_disk_offload_match_the_plain_model(checkpoints, reference, tmp_path):
    device_map = {**DISK_MAP, "embed": 0, "head": 0, "blocks.0": 0}
    model = load_checkpoint_and_dispatch(
        empty_net(), checkpoints["sharded"], device_map=device_map, offload_folder=tmp_path
    )
    assert model.blocks[0].up.weight.device == torch.device("cuda", 0)
    assert model.blocks[3].up.weight.is_meta  # on "cpu" with a GPU main device: streamed in
    out = run(model, reference[1])
    assert out.device == torch.device("cuda", 0)
    torch.testing.assert_close(out.cpu(), reference[2], rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_gpu_cpu_offload_streams_weights(reference):
    model = cpu_offload(_copy(reference[0]), execution_device=0)
    before = torch.cuda.memory_allocated(0)
    out = run(model, reference[1])
    assert out.device.type == "cuda"
    assert torch.cuda.memory_allocated(0) - before < 64 * 1024  # only the output stays
    torch.testing.assert_close(out.cpu(), reference[2], rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_transformers_generate_on_gpu_cpu_and_disk_matches_the_plain_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    from distrib import compute_module_sizes, init_empty_weights
    from distrib.big_modeling._placement import is_flat

    config = transformers.GPT2Config(
        n_layer=6, n_embd=128, n_head=4, vocab_size=1024, bos_token_id=0, eos_token_id=1
    )
    torch.manual_seed(0)
    plain = transformers.AutoModelForCausalLM.from_config(config).eval()
    plain.save_pretrained(tmp_path / "ckpt", max_shard_size="300KB")
    ids = torch.randint(2, 1024, (2, 9))
    kwargs = {"max_new_tokens": 8, "do_sample": False}
    with torch.no_grad():
        expected = plain.to(0).generate(ids.to(0), attention_mask=torch.ones_like(ids).to(0), **kwargs)
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    total = compute_module_sizes(model)[""]
    model = load_checkpoint_and_dispatch(
        model,
        tmp_path / "ckpt",
        max_memory={0: int(total * 0.5), "cpu": int(total * 0.3)},
        offload_folder=tmp_path / "offload",
    )
    assert is_flat(model.hf_device_map)
    assert set(model.hf_device_map.values()) == {0, "cpu", "disk"}
    with torch.no_grad():
        generated = model.generate(ids.to(0), attention_mask=torch.ones_like(ids).to(0), **kwargs)
    assert generated.device == torch.device("cuda", 0)
    assert torch.equal(generated, expected)


@pytest.mark.gpu
def test_cpu_offload_with_hook_moves_whole_models_to_the_gpu_and_back(reference):
    from distrib import cpu_offload_with_hook

    first = _copy(reference[0])
    second = torch.nn.Linear(64, 3)
    first, hook_1 = cpu_offload_with_hook(first, 0)
    second, hook_2 = cpu_offload_with_hook(second, 0, prev_module_hook=hook_1)
    assert first.embed.weight.device.type == "cpu"
    with torch.no_grad():
        hidden = first(reference[1])
        assert first.embed.weight.device == torch.device("cuda", 0)
        out = second(hidden)
    assert first.embed.weight.device.type == "cpu"  # sent back when the next model started
    assert second.weight.device == torch.device("cuda", 0) and out.device.type == "cuda"
    hook_2.offload()
    assert second.weight.device.type == "cpu"
    torch.testing.assert_close(hidden.cpu(), reference[2], rtol=1e-4, atol=1e-5)
