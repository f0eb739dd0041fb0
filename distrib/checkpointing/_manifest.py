"""`manifest.json`: every file of a checkpoint with its size and checksum, plus what the run was.

The manifest is written last; a directory without one is not a complete checkpoint. Sizes and CRC-32C
checksums come from the writers, computed from the bytes as they were written; only files written by
user hooks (or copied in by a backend, like DeepSpeed's helper scripts) are read back to checksum them;
they are marked `"recorded": false` and verified before the load hooks run. `save_counter` grows with every save into a folder, so "latest" and rotation follow the order
checkpoints were written in, not their step numbers (a run resumed from an earlier step writes newer
checkpoints with smaller steps).

Format version 1 manifests (CRC-32, SHA-256 or BLAKE2b checksums, no save counter) still load.
Everything read from a manifest is validated: a malformed one is a `CheckpointCorruptError` naming the
file and the key, never a raw exception.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

from ..errors import CheckpointCorruptError, CheckpointError
from ._crc import hexdigest
from ._files import checksum
from ._io import DurableFile, Ledger

if TYPE_CHECKING:
    from collections.abc import Iterable

MANIFEST = "manifest.json"
FORMAT = "distrib-checkpoint"
FORMAT_VERSION = 2
CHECKSUM = "crc32c"
#: checksum name -> hex digits of its digest (the older ones are read, never written)
CHECKSUMS = {"crc32c": 8, "crc32": 8, "sha256": 64, "blake2b": 128}
Verify = Literal["checksum", "size"]
_HEX = re.compile(r"[0-9a-f]+")


def name_problem(name: object) -> str | None:
    """Why `name` cannot be a file of a checkpoint (None when it can): it must be a relative POSIX path
    inside the checkpoint, without `..`, `.` or empty parts."""
    if not isinstance(name, str) or not name:
        return "is not a file name"
    if "\\" in name or "\x00" in name or name.startswith("/") or re.match(r"[A-Za-z]:", name):
        return "is an absolute path or not a POSIX path"
    parts = PurePosixPath(name).parts
    if any(p in ("..", ".") for p in parts) or name.split("/") != list(parts):
        return "leaves the checkpoint directory or is not a normalized path"
    if name == MANIFEST:
        return "is the manifest itself"
    return None


def list_files(directory: Path) -> list[str]:
    """Relative POSIX names of every regular file under `directory` except the manifest, sorted.

    Symbolic links are refused: a checkpoint holds its files, it does not point elsewhere."""
    found = []
    for p in directory.rglob("*"):
        if p.is_symlink():
            raise CheckpointError(
                f"{str(p)!r} is a symbolic link; checkpoint files must be regular files inside the "
                "checkpoint (a save hook wrote it? copy the file instead)."
            )
        if p.is_file() and p.name != MANIFEST:
            found.append(p.relative_to(directory).as_posix())
    return sorted(found)


def describe_unrecorded(directory: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Size and CRC-32C of files no distrib writer recorded (written by hooks), read back once."""
    from ._io import map_in_threads

    def one(name: str) -> dict[str, Any]:
        path = directory / name
        crc = int(checksum(path, "crc32c"), 16)
        return {"size": path.stat().st_size, CHECKSUM: hexdigest(crc), "recorded": False}

    names = list(names)
    return dict(zip(names, map_in_threads(one, names)))


def build(metadata: dict[str, Any], files: dict[str, dict[str, Any]], save_counter: int) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **metadata,
        "save_counter": save_counter,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "checksum": CHECKSUM,
        "files": dict(sorted(files.items())),
    }


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write `manifest.json` into `directory` (fsynced; the caller fsyncs the directory)."""
    text = json.dumps(manifest, indent=1).encode("utf-8")
    with DurableFile(directory / MANIFEST, Ledger(directory)) as f:
        f.write(text)


def read_manifest(directory: Path) -> dict[str, Any]:
    """The parsed, validated manifest of a checkpoint; `CheckpointCorruptError` naming the file if absent
    or malformed."""
    path = directory / MANIFEST
    if not path.is_file():
        raise CheckpointCorruptError(
            f"{str(path)!r} is missing, so {str(directory)!r} is not a complete distrib checkpoint: the "
            "manifest is written last, so the save that made it did not finish (or the directory is not "
            "a checkpoint). Load an earlier checkpoint, e.g. load_state('latest')."
        )
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointCorruptError(f"cannot read {str(path)!r}: {e}") from e
    validate(manifest, path)
    return manifest  # type: ignore[no-any-return]


def peek_counter(directory: Path) -> int | None:
    """The save counter of a complete checkpoint; -1 for a version-1 manifest; None if unreadable."""
    try:
        manifest = read_manifest(directory)
    except CheckpointError:
        return None
    return int(manifest.get("save_counter", -1))


def _int(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def validate(manifest: Any, path: Path) -> None:
    """Raise `CheckpointCorruptError` naming `path` and the first problem of a parsed manifest."""
    problem = _problem(manifest)
    if problem is not None:
        raise CheckpointCorruptError(
            f"{str(path)!r} is not a valid distrib checkpoint manifest: {problem}. Restore the file or load "
            "another checkpoint."
        )


def _problem(m: Any) -> str | None:
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        return f"'format' is not {FORMAT!r}"
    version: Any = m.get("format_version")
    if not _int(version, 1):
        return f"'format_version' is {version!r}, not a positive integer"
    if version > FORMAT_VERSION:
        return (
            f"format version {version} is newer than this distrib understands ({FORMAT_VERSION}); upgrade "
            "distrib to load it"
        )
    algorithm = m.get("checksum")
    if algorithm not in CHECKSUMS:
        return f"'checksum' is {algorithm!r}, not one of {', '.join(CHECKSUMS)}"
    for key, minimum in (("world_size", 1), ("step", 0)):
        if not _int(m.get(key), minimum):
            return f"{key!r} is {m.get(key)!r}, not an integer >= {minimum}"
    if version >= 2 and not _int(m.get("save_counter")):
        return f"'save_counter' is {m.get('save_counter')!r}, not an integer >= 0"
    if not isinstance(m.get("strategy"), str):
        return f"'strategy' is {m.get('strategy')!r}, not a name"
    contents = m.get("contents", {})
    if not (isinstance(contents, dict) and all(_int(v) for v in contents.values())):
        return "'contents' is not a mapping of counts"
    return _files_problem(m.get("files"), algorithm)


def _files_problem(files: Any, algorithm: str) -> str | None:
    if not isinstance(files, dict):
        return "'files' is not a mapping"
    for name, entry in files.items():
        why = name_problem(name)
        if why is not None:
            return f"the file entry {name!r} {why}"
        if not isinstance(entry, dict) or not _int(entry.get("size")):
            return f"the entry of {name!r} has no size in bytes"
        digest = entry.get(algorithm)
        if not (isinstance(digest, str) and len(digest) == CHECKSUMS[algorithm] and _HEX.fullmatch(digest)):
            return f"the entry of {name!r} has no valid {algorithm} digest"
    return None


def expected_crc(manifest: dict[str, Any], name: str) -> int | None:
    """The CRC-32C a file must have, or None when the manifest uses another checksum."""
    if manifest["checksum"] != CHECKSUM:
        return None
    return int(manifest["files"][name][CHECKSUM], 16)


def verify_by_reading(directory: Path, manifest: dict[str, Any], name: str) -> None:
    """Check one file against the manifest by reading it (any checksum algorithm); raise if it differs."""
    entry, path = manifest["files"][name], directory / name
    size = path.stat().st_size
    if size != entry["size"]:
        raise CheckpointCorruptError(
            f"{str(path)!r} has {size} bytes, {entry['size']} expected (truncated or overwritten); restore "
            "it or load an earlier checkpoint."
        )
    algorithm = manifest["checksum"]
    actual = checksum(path, algorithm)
    if actual != entry[algorithm]:
        raise CheckpointCorruptError(
            f"{str(path)!r} does not match its {algorithm} checksum (the file is corrupted); restore it or "
            "load an earlier checkpoint."
        )


def inside(directory: Path, name: str) -> Path:
    """`directory / name`, refusing a path that a symbolic link leads out of the checkpoint."""
    path = directory / name
    root = os.path.realpath(directory)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise CheckpointCorruptError(
            f"{str(path)!r} leads outside the checkpoint {str(directory)!r} (a symbolic link); a checkpoint's "
            "files must be inside it. Remove the link or restore the file."
        )
    return path
