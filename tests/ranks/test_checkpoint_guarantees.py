"""Checkpoint guarantees on two real processes: background saves under DDP and FSDP2 (DCP async_save),
failures on one rank reaching every rank as the same error (rank 0's manifest write, a full disk), and
pickled payloads that never run, for every strategy that runs here (single is in tests/unit)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from distrib import distributed, load_state, prepare, register_save_state_pre_hook, save_state
from distrib.errors import CheckpointCorruptError, CheckpointError
from distrib.testing import run_ranks
from tests._support.models import full_state, make_loader, make_model, max_difference, run_loop

pytestmark = pytest.mark.slow


def _fresh(seed: int) -> tuple[Any, Any, Any]:
    model = make_model(seed)
    return prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2), make_loader())


def _plus_one(model: Any) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)


def _background_worker(root: str) -> dict[str, Any]:
    dist.init_process_group("gloo")  # one group for every scope (DeepSpeed and FSDP keep global state)
    out: dict[str, Any] = {}
    try:
        for strategy in ("ddp", "fsdp"):
            project = Path(root) / strategy
            with distributed(strategy=strategy, project_dir=str(project), total_limit=2) as ctx:
                model, optimizer, loader = _fresh(0)
                run_loop(model, optimizer, loader)
                saved = full_state(ctx, model)
                handle = save_state(background=True)
                _plus_one(model)  # right after the call: must not reach the checkpoint
                run_loop(model, optimizer, loader)  # training (and its collectives) goes on meanwhile
                continued = full_state(ctx, model)
                path = handle.wait()
                ctx.state.optimizer_steps += 1
                second = save_state(background=True)  # the scope's exit waits for it
            out[strategy] = {"path": str(path), "second": str(second.path), "done_at_exit": second.done()}
            with distributed(strategy=strategy, project_dir=str(project)) as ctx:
                model, optimizer, loader = _fresh(5)
                load_state(path)
                loaded = full_state(ctx, model)
                _plus_one(model)  # redo what the first run did after its save
                run_loop(model, optimizer, loader)
                resumed = full_state(ctx, model)
            if ctx.rank == 0:
                out[strategy]["loaded_vs_saved"] = max_difference(loaded, saved)
                out[strategy]["resumed_vs_continued"] = max_difference(resumed, continued)
    finally:
        dist.barrier()
        dist.destroy_process_group()
    return out


def test_background_saves_under_ddp_and_fsdp_hold_the_snapshot(tmp_path: Path) -> None:
    results = run_ranks(_background_worker, 2, str(tmp_path), timeout=300)
    for strategy in ("ddp", "fsdp"):
        out = results[0][strategy]
        assert out["done_at_exit"], strategy
        assert out["loaded_vs_saved"] == 0.0, f"{strategy}: the checkpoint is not the snapshot"
        assert out["resumed_vs_continued"] < 1e-6, f"{strategy}: the resumed run differs"
        assert (Path(out["second"]) / "manifest.json").is_file(), strategy
        if strategy == "fsdp":
            assert len(list(Path(out["path"]).glob("*.distcp"))) == 2  # DCP: one shard file per rank


def _manifest_failure_worker(root: str) -> str:
    with distributed(project_dir=root) as ctx:
        model = torch.nn.Linear(4, 4)
        prepare(model)

        def block_the_manifest(models: list[Any], directory: Path) -> None:
            if ctx.rank == 0:  # rank 0 alone cannot create manifest.json: a real OS error, on one rank
                (directory / "manifest.json").mkdir()

        register_save_state_pre_hook(block_the_manifest)
        try:
            save_state()
        except CheckpointError as e:
            return f"{type(e).__name__}: {e}"
        return "no error"


def test_a_failure_while_rank_0_writes_the_manifest_reaches_every_rank(tmp_path: Path) -> None:
    messages = run_ranks(_manifest_failure_worker, 2, str(tmp_path), timeout=120)
    for rank, message in enumerate(messages):
        assert "manifest.json" in message and "File exists" in message, f"rank {rank}: {message}"
    assert "on rank 0" in messages[1]
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())


def _full_disk_worker(root: str) -> str:
    with distributed(project_dir=root):
        model = torch.nn.Linear(1024, 1024)  # 4 MB of weights for a 2 MB disk
        prepare(model)
        try:
            save_state()
        except CheckpointError as e:
            return str(e)
        return "no error"


def test_a_full_disk_stops_every_rank_with_the_same_error(tmp_path: Path) -> None:
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        messages = run_ranks(_full_disk_worker, 2, str(mount), timeout=120)
    finally:
        subprocess.run(["umount", str(mount)], check=False)
    for rank, message in enumerate(messages):
        assert "no space left on device while writing" in message, f"rank {rank}: {message}"
        # the file named is the one whose write failed first (files are written in parallel)
        assert re.search(r"writing '[^']*/\.tmp-step_000000-[^/']*/[^/']+\.safetensors'", message), message
        assert "of the checkpoint '" in message and "checkpoints/step_000000'" in message, message
        assert "Earlier checkpoints are intact" in message, message


class _Boom:
    """Unpickling it would run a shell command that creates a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _forge_metadata(path: Path, marker: str) -> None:
    """Replace DCP's `.metadata` (a pickle) with a payload, and update the manifest to match."""
    import json
    import pickle

    from distrib.checkpointing._crc import crc32c

    data = pickle.dumps(_Boom(marker))
    (path / ".metadata").write_bytes(data)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][".metadata"] = {"size": len(data), "crc32c": f"{crc32c(data):08x}"}
    (path / "manifest.json").write_text(json.dumps(manifest))


def _payload_worker(root: str, strategy: str, where: str) -> str:
    """Save with a payload in the optimizer's state (a value the training loop keeps next to the
    parameters), or forge DCP's metadata file, then load: safe loading must refuse it, naming the
    opt-in."""
    dist.init_process_group("gloo")
    marker = f"{root}/pwned"
    try:
        with distributed(strategy=strategy) as ctx:
            model, optimizer, loader = _fresh(0)
            run_loop(model, optimizer, loader)
            getattr(optimizer, "optimizer", optimizer).param_groups[0]["note"] = _Boom(marker)
            path = save_state(Path(root) / "ckpt")
            if where == "metadata" and ctx.rank == 0:
                _forge_metadata(path, marker)
            dist.barrier()
        with distributed(strategy=strategy) as ctx:
            _, optimizer, _ = _fresh(5)
            getattr(optimizer, "optimizer", optimizer).param_groups[0]["note"] = None  # DCP reads it
            try:
                load_state(path)
            except CheckpointCorruptError as e:
                return str(e)
            return f"loaded on rank {ctx.rank}"
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.parametrize(("strategy", "where"), [("ddp", "state"), ("fsdp", "state"), ("fsdp", "metadata")])
def test_a_pickled_payload_never_runs(tmp_path: Path, strategy: str, where: str) -> None:
    messages = run_ranks(_payload_worker, 2, str(tmp_path), strategy, where, timeout=180)
    for message in messages:
        if where == "metadata":  # DCP's own metadata file: only DCP's classes may be unpickled
            assert ".metadata' is not DCP metadata that loads safely" in message and "posix.system" in message
        else:
            assert "weights_only=False" in message and "posix.system" in message, message
    assert not (tmp_path / "pwned").exists(), "the payload ran"
