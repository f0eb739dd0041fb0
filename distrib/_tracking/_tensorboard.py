"""TensorBoard through `torch.utils.tensorboard.SummaryWriter` (needs `pip install 'distrib[tensorboard]'`)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from ..errors import DistribWarning, missing_extra
from ._base import flatten, is_number


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
        self._skipped: set[str] = set()

    def start(self, project_name: str, config: dict[str, Any]) -> None:
        summary_writer = _summary_writer_class()
        log_dir = self.logging_dir / project_name
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

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __repr__(self) -> str:
        return f"TensorBoardTracker(logging_dir={str(self.logging_dir)!r})"
