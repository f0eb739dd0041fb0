"""The dependency-free default tracker: one JSON object per `log` call in a `.jsonl` file."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import IO, Any

#: keys every metrics.jsonl record has; `log(...)` refuses values under these names.
RESERVED_KEYS = ("step", "wall_time", "optimizer_step")


class JSONLTracker:
    """Write `<logging_dir>/<project_name>/metrics.jsonl` and `config.json`; needs no extra package.

    Each `log(values, step)` appends one line:
    `{"step": step, "wall_time": <unix time>, "optimizer_step": <the run's optimizer steps>, **values}`, and
    flushes it, so the file is complete even if the run dies. A run that starts again in the same
    directory appends to the same file; when it resumed from a checkpoint (`load_state`), the records
    logged after that checkpoint by the run that died are dropped first (`rewind`), so the file holds
    each step once. `config.json` holds the hyper-parameters. Read it back with
    `pandas.read_json(path, lines=True)` or line by line with `json.loads`. Example::

        init_trackers("mnist", config={"lr": 1e-3}, trackers=[JSONLTracker("runs")])
    """

    name = "jsonl"

    def __init__(self, logging_dir: str | os.PathLike[str] = "runs") -> None:
        self.logging_dir = Path(logging_dir)
        self.run_dir: Path | None = None
        self.writer: IO[str] | None = None
        self.optimizer_step: int | None = None  # set by distrib before each log()

    @property
    def metrics_path(self) -> Path:
        """Where the metrics go (`<logging_dir>/<project_name>/metrics.jsonl`) once started."""
        if self.run_dir is None:
            raise RuntimeError("this JSONLTracker has not been started; call init_trackers(...) first.")
        return self.run_dir / "metrics.jsonl"

    def start(self, project_name: str, config: dict[str, Any]) -> None:
        self.run_dir = self.logging_dir / project_name
        self.run_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        (self.run_dir / "config.json").write_text(text + "\n", encoding="utf-8")
        self.writer = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in finish()

    def log(self, values: dict[str, Any], step: int | None) -> None:
        if self.writer is None:
            raise RuntimeError("this JSONLTracker is not running; call init_trackers(...) first.")
        record = {"step": step, "wall_time": time.time(), "optimizer_step": self.optimizer_step, **values}
        self.writer.write(json.dumps(record, default=str) + "\n")
        self.writer.flush()

    def rewind(self, optimizer_step: int) -> None:
        """Drop the records logged after optimizer step `optimizer_step` (a resumed run's checkpoint)."""
        if self.writer is None:
            return
        self.writer.close()
        kept = [line for line in self._lines() if _logged_at_or_before(line, optimizer_step)]
        temp = self.metrics_path.with_name(self.metrics_path.name + ".rewind")
        temp.write_text("".join(kept), encoding="utf-8")
        os.replace(temp, self.metrics_path)
        self.writer = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in finish()

    def _lines(self) -> list[str]:
        with open(self.metrics_path, encoding="utf-8") as f:
            return [line if line.endswith("\n") else line + "\n" for line in f if line.strip()]

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __repr__(self) -> str:
        return f"JSONLTracker(logging_dir={str(self.logging_dir)!r})"


def _logged_at_or_before(line: str, optimizer_step: int) -> bool:
    try:
        logged = json.loads(line).get("optimizer_step")
    except (json.JSONDecodeError, AttributeError):
        return True  # not ours to judge: keep it
    return not isinstance(logged, int) or logged <= optimizer_step
