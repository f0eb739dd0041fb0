"""TensorBoard through `torch.utils.tensorboard.SummaryWriter` (needs `pip install 'distrib[tensorboard]'`)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from ..errors import DistribWarning, missing_extra
from ._base import flatten, is_number

#: (optimizer step, logged step) of every log call, for `rewind`
STEPS_FILE = "distrib_steps.txt"


def _summary_writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises ImportError naming tensorboard when the package is missing
        raise missing_extra("tensorboard", "tensorboard", "The 'tensorboard' tracker") from None
    return SummaryWriter


class TensorBoardTracker:
    """Write TensorBoard event files under `<logging_dir>/<project_name>`.

    Numbers become scalars, strings become text, nested dicts become scalars named `outer/inner`; other
    values are skipped with a warning. The config is written as hyper-parameters (the HPARAMS tab).
    `writer` is the `SummaryWriter`, for images, histograms and the rest. Extra keywords go to
    `SummaryWriter`. Example::

        init_trackers("mnist", config={"lr": 1e-3}, trackers="tensorboard")
        get_tracker("tensorboard", unwrap=True).add_histogram("weights", model.weight, step)
    """

    name = "tensorboard"

    def __init__(self, logging_dir: str | os.PathLike[str] = "runs", **writer_kwargs: Any) -> None:
        self.logging_dir = Path(logging_dir)
        self.writer_kwargs = writer_kwargs
        self.writer: Any = None
        self.optimizer_step: int | None = None  # set by distrib before each log()
        self._skipped: set[str] = set()
        self._log_dir: Path | None = None

    def start(self, project_name: str, config: dict[str, Any]) -> None:
        summary_writer = _summary_writer_class()
        log_dir = self._log_dir = self.logging_dir / project_name
        self.writer = summary_writer(log_dir=str(log_dir), **self.writer_kwargs)
        if config:
            self._write_hparams(config)
        self.writer.flush()

    def _write_hparams(self, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        plain = {
            key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in flatten(config).items()
        }
        file_writer = self.writer._get_file_writer()
        for summary in hparams(plain, {}):
            file_writer.add_summary(summary)

    def log(self, values: dict[str, Any], step: int | None) -> None:
        if step is not None and self.optimizer_step is not None and self._log_dir is not None:
            with open(self._log_dir / STEPS_FILE, "a", encoding="utf-8") as journal:
                journal.write(f"{self.optimizer_step} {step}\n")
        for key, value in flatten(values).items():
            if is_number(value):
                self.writer.add_scalar(key, value, global_step=step)
            elif isinstance(value, str):
                self.writer.add_text(key, value, global_step=step)
            elif key not in self._skipped:
                self._skipped.add(key)
                warnings.warn(
                    f"the tensorboard tracker skips {key!r}: it logs numbers and strings, not "
                    f"{type(value).__name__}; use get_tracker('tensorboard', unwrap=True) for other kinds.",
                    DistribWarning,
                    stacklevel=3,
                )
        self.writer.flush()

    def rewind(self, optimizer_step: int) -> None:
        """Hide what the run that died logged after the checkpoint: TensorBoard's `purge_step` drops the
        events from the first step logged after optimizer step `optimizer_step` on."""
        if self.writer is None or self._log_dir is None or not (self._log_dir / STEPS_FILE).is_file():
            return
        pairs = [
            line.split() for line in (self._log_dir / STEPS_FILE).read_text().splitlines() if line.strip()
        ]
        kept = [(int(o), int(s)) for o, s in pairs if int(o) <= optimizer_step]
        later = [int(s) for o, s in pairs if int(o) > optimizer_step]
        (self._log_dir / STEPS_FILE).write_text("".join(f"{o} {s}\n" for o, s in kept))
        if not later:
            return
        self.writer.close()
        purge = max((s for _, s in kept), default=-1) + 1
        self.writer = _summary_writer_class()(
            log_dir=str(self._log_dir), purge_step=purge, **self.writer_kwargs
        )

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __repr__(self) -> str:
        return f"TensorBoardTracker(logging_dir={str(self.logging_dir)!r})"
