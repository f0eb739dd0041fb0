"""`manifest.json`: every file of a checkpoint with its size and checksum, plus what the run was.

The manifest is written last; a directory without one is not a complete checkpoint. Checksums are
computed (and files fsynced) in parallel, each rank taking a share of the files, and verified the same way
on load, so that every rank reports the same damaged files.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from ..errors import CheckpointCorruptError
from ._files import CHECKSUM, checksum, fsync_dir, fsync_file
from ._layout import MANIFEST
from ._sync import broadcast_from_main, run_on_every_rank

if TYPE_CHECKING:
    from .._runtime import Runtime

FORMAT = "distrib-checkpoint"
FORMAT_VERSION = 1
Verify = Literal["checksum", "size"]
T = TypeVar("T")


def list_files(directory: Path) -> list[tuple[str, int]]:
    """(relative POSIX path, size) of every file under `directory` except the manifest, largest first."""
    found = [
        (p.relative_to(directory).as_posix(), p.stat().st_size)
        for p in directory.rglob("*")
        if p.is_file() and p.name != MANIFEST
    ]
    return sorted(found, key=lambda item: (-item[1], item[0]))


def _share(runtime: Runtime, files: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """This rank's part of the files: dealt round-robin, largest first, so the work is balanced."""
    return files[runtime.rank :: runtime.world_size]


def _in_threads(fn: Callable[[str], T], names: list[str]) -> list[T]:
    """`fn` over `names` in a few threads: hashing and fsync release the GIL, so files overlap."""
    if len(names) <= 1:
        return [fn(name) for name in names]
    with ThreadPoolExecutor(max_workers=min(len(names), os.cpu_count() or 1, 8)) as pool:
        return list(pool.map(fn, names))


def _describe(directory: Path, files: list[tuple[str, int]]) -> dict[str, dict[str, Any]]:
    def one(name: str) -> dict[str, Any]:
        path = directory / name
        fsync_file(path)
        return {"size": path.stat().st_size, CHECKSUM: checksum(path)}

    names = [name for name, _ in files]
    return dict(zip(names, _in_threads(one, names)))


def write_manifest(runtime: Runtime, directory: Path, metadata: dict[str, Any]) -> None:
    """Checksum and fsync every file in `directory` (shared between ranks), then rank 0 writes the
    manifest. All ranks call it after all of them finished writing."""
    files = broadcast_from_main(runtime, list_files(directory) if runtime.rank == 0 else None)
    parts = run_on_every_rank(
        runtime, "checksumming the checkpoint", lambda: _describe(directory, _share(runtime, files))
    )
    if runtime.rank != 0:
        return
    entries = {name: entry for part in parts for name, entry in part.items()}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **metadata,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "checksum": CHECKSUM,
        "files": dict(sorted(entries.items())),
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    fsync_file(directory / MANIFEST)
    fsync_dir(directory)


def read_manifest(directory: Path) -> dict[str, Any]:
    """The parsed manifest of a checkpoint; `CheckpointCorruptError` naming the file if absent or bad."""
    path = directory / MANIFEST
    if not path.is_file():
        raise CheckpointCorruptError(
            f"{str(path)!r} is missing, so {str(directory)!r} is not a complete distrib checkpoint: the "
            "manifest is written last, so the save that made it did not finish (or the directory is not "
            "a checkpoint). Load an earlier checkpoint, e.g. load_state('latest')."
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointCorruptError(f"cannot read {str(path)!r}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointCorruptError(f"{str(path)!r} is not a distrib checkpoint manifest.")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointCorruptError(
            f"{str(path)!r} has format version {manifest['format_version']}, newer than this distrib "
            f"understands ({FORMAT_VERSION}); upgrade distrib to load it."
        )
    return manifest


def _problems(directory: Path, manifest: dict[str, Any], names: list[str], verify: Verify) -> list[str]:
    algorithm = manifest.get("checksum", CHECKSUM)

    def one(name: str) -> str | None:
        entry, path = manifest["files"][name], directory / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{name} has {size} bytes, {entry['size']} expected (truncated or overwritten)"
        if verify == "checksum" and checksum(path, algorithm) != entry[algorithm]:
            return f"{name} does not match its {algorithm} checksum (the file is corrupted)"
        return None

    return [problem for problem in _in_threads(one, names) if problem is not None]


def verify_files(runtime: Runtime, directory: Path, manifest: dict[str, Any], verify: Verify) -> None:
    """Check every file the manifest lists (sizes always, checksums when `verify="checksum"`), each rank
    taking a share; raise `CheckpointCorruptError` on every rank, naming every bad file."""
    if verify not in ("checksum", "size"):
        raise ValueError(f"verify={verify!r} must be 'checksum' or 'size'.")
    files = sorted(((n, int(e["size"])) for n, e in manifest["files"].items()), key=lambda f: (-f[1], f[0]))
    mine = [name for name, _ in _share(runtime, files)]
    parts = run_on_every_rank(
        runtime, "verifying the checkpoint", lambda: _problems(directory, manifest, mine, verify)
    )
    problems = [p for part in parts for p in part]
    if problems:
        raise CheckpointCorruptError(
            f"checkpoint {str(directory)!r} failed verification: {'; '.join(sorted(problems))}. Restore "
            "the files or load an earlier checkpoint."
        )
