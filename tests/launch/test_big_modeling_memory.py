"""Peak memory of streaming loads and offloaded forwards, measured in a fresh process.

The goal: RAM within the budget plus one layer (the layer prefetched while another runs; the budget itself
keeps room for the running one), whatever the model's size.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

DIM, NUM_BLOCKS, BLOCKS_PER_SHARD = 2048, 10, 2
MiB = 2**20
BLOCK_BYTES = 2 * (DIM * DIM + DIM) * 4  # two Linear(DIM, DIM) in fp32: ~32 MiB
MODEL_BYTES = NUM_BLOCKS * BLOCK_BYTES  # ~320 MiB
BUDGET = 100 * MiB

CHILD = textwrap.dedent(
    """
    import json, re, sys
    import torch
    from torch import nn
    from distrib import init_empty_weights, load_checkpoint_and_dispatch
    import distrib.big_modeling  # imports done before measuring


    def peak_rss():  # VmHWM: the same high-water mark as getrusage's ru_maxrss, but resettable
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024


    dim, num_blocks, budget, checkpoint, offload = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS, forgetting the imports' peak
    baseline = peak_rss()
    with init_empty_weights():
        model = nn.Sequential(*(nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim)) for _ in range(num_blocks)))
    model = load_checkpoint_and_dispatch(
        model, checkpoint, max_memory={"cpu": budget}, no_split_module_classes=["Sequential"], offload_folder=offload
    )
    after_load = peak_rss()
    with torch.no_grad():
        checksum = float(model(torch.ones(1, dim)).sum())
    peak = peak_rss()
    resident = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
    report = {"load": after_load - baseline, "peak": peak - baseline, "checksum": checksum, "resident": resident}
    print(json.dumps(report))
    """
)


def write_checkpoint(folder: Path) -> float:
    """Write the model shard by shard (never all in RAM) and return the expected output checksum."""
    torch.manual_seed(0)
    weight_map: dict[str, str] = {}
    x = torch.ones(1, DIM)
    for shard in range(NUM_BLOCKS // BLOCKS_PER_SHARD):
        tensors = {}
        for block in range(shard * BLOCKS_PER_SHARD, (shard + 1) * BLOCKS_PER_SHARD):
            for layer in (0, 2):
                weight = torch.randn(DIM, DIM) / DIM**0.5
                bias = torch.randn(DIM) * 0.01
                tensors[f"{block}.{layer}.weight"], tensors[f"{block}.{layer}.bias"] = weight, bias
                x = torch.nn.functional.linear(x, weight, bias)
                x = torch.relu(x) if layer == 0 else x
        name = f"model-{shard + 1:05d}.safetensors"
        save_file(tensors, folder / name)
        weight_map.update(dict.fromkeys(tensors, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return float(x.sum())


@pytest.mark.slow
@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="measures peak RSS through Linux /proc"
)
def test_peak_rss_stays_within_the_budget_plus_one_layer(tmp_path):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    expected = write_checkpoint(checkpoint)
    args = [str(DIM), str(NUM_BLOCKS), str(BUDGET), str(checkpoint), str(tmp_path / "offload")]
    result = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["checksum"] == pytest.approx(expected, rel=1e-4)
    slack = 24 * MiB  # the interpreter's own allocations, activations
    assert measured["load"] < BUDGET + slack, f"load grew RSS by {measured['load'] / MiB:.0f} MiB"
    limit = BUDGET + BLOCK_BYTES + slack  # the budget plus the one layer read ahead
    assert measured["peak"] < limit, f"forward grew RSS by {measured['peak'] / MiB:.0f} MiB"
    assert 0 < measured["resident"] <= BUDGET - BLOCK_BYTES  # part in RAM, room kept for one streamed block
    assert 3 * BUDGET < MODEL_BYTES  # the model really is several times the budget
    assert not list((tmp_path / "offload").glob("*.dat"))  # disk layers were read from the checkpoint
