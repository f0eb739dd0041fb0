"""Worker bootstrap: `python -m distrib._launch.worker [--module] TARGET [ARGS...]`.

Runs the user's script (or module) as `__main__`, exactly as `python script.py` would, and when it raises
records the exception in the error file torch's elastic agent gave this worker
(`TORCHELASTIC_ERROR_FILE`, written by torch's own `ErrorHandler`), so the launcher can report the
traceback of the rank that failed without the user adding `@record` to their code. It also ties the
worker's life to the launcher and leaves the launcher an exit record (`records.py`). Only the standard
library is imported before the user's code runs, so the script's first line runs as early as it would
under torchrun.
"""

from __future__ import annotations

import atexit
import builtins
import faulthandler
import gc
import importlib.machinery
import importlib.util
import io
import os
import runpy
import sys
import threading
import types
from collections.abc import Callable
from importlib.machinery import ModuleSpec
from typing import Any

from . import records


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    is_module = bool(args) and args[0] == "--module"
    if is_module:
        args = args[1:]
    if not args:
        raise SystemExit("usage: python -m distrib._launch.worker [--module] TARGET [ARGS...]")
    faulthandler.enable(all_threads=True)
    records.install_worker_guards()
    try:
        run(args[0], args[1:], is_module=is_module)
    except SystemExit as exc:  # sys.exit(...) in the script: leave with its status, as Python would
        records.record_exit(_status(exc.code), exc, how="sys.exit")
        _finish(exc.code)
        raise
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        records.record_exit(1, exc, how="exception")
        _record(exc)
        raise
    records.record_exit(0, how="returned")
    _finish(None)


def run_function(fn: Callable[..., Any], *args: Any) -> Any:
    """Entry point of a worker that runs a function (`notebook_launcher`): the same guards and exit record
    as a script worker, around `fn(*args)`."""
    records.install_worker_guards()
    try:
        value = fn(*args)
    except SystemExit as exc:
        records.record_exit(_status(exc.code), exc, how="sys.exit")
        raise
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        records.record_exit(1, exc, how="exception")
        raise
    records.record_exit(0, how="returned")
    return value


def run(target: str, args: list[str], *, is_module: bool) -> dict[str, Any]:
    """Run a script path or a module name as `__main__` with `sys.argv` set for it; return its globals.

    Like `python script.py` (and unlike `runpy.run_path`, which returns a copy), the script runs in a
    `__main__` module this bootstrap owns, so its globals can be released at the end (see `_finish`).
    """
    sys.argv = [target, *args]
    if is_module:
        spec = _main_spec(target)
        assert spec.loader is not None and spec.origin is not None
        sys.argv[0] = spec.origin
        code = spec.loader.get_code(spec.name)  # type: ignore[attr-defined]
        return _exec_as_main(code, spec.origin, spec=spec, package=spec.parent)
    sys.path[0] = os.path.dirname(os.path.abspath(target))
    if not os.path.isfile(target):  # a directory or zip file with a __main__.py
        return runpy.run_path(target, run_name="__main__")
    path = os.path.abspath(target)  # as `python script.py` since Python 3.9: __file__ and tracebacks
    with open(path, "rb") as source:
        code = compile(source.read(), path, "exec")
    return _exec_as_main(code, path, spec=None, package=None)


def _main_spec(name: str) -> ModuleSpec:
    """The spec `python -m name` would run (a package runs its `__main__` submodule)."""
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.submodule_search_locations is not None:
        spec = importlib.util.find_spec(name + ".__main__")
    if spec is None or spec.loader is None:
        raise ImportError(f"No module named {name!r} (looked up on sys.path, as python -m {name} would)")
    return spec


def _exec_as_main(
    code: Any, filename: str, *, spec: ModuleSpec | None, package: str | None
) -> dict[str, Any]:
    """Execute `code` as the `__main__` module, which stays in `sys.modules` (pickling by reference works)."""
    module = types.ModuleType("__main__")
    module.__dict__.update(
        __file__=filename,
        __builtins__=builtins,
        __spec__=spec,
        __package__=package,
        __loader__=spec.loader if spec else importlib.machinery.SourceFileLoader("__main__", filename),
        __cached__=None,
    )
    sys.modules["__main__"] = module
    _script_globals.append(module.__dict__)
    exec(code, module.__dict__)
    return module.__dict__


#: the globals of the script this bootstrap runs (released by `_finish`)
_script_globals: list[dict[str, Any]] = []


def _finish(code: Any) -> None:
    """Leave as `raise SystemExit(code)` would after the script returned (None) or called sys.exit(code),
    skipping only the interpreter's own finalization, which can turn a finished gloo run into a crash.

    Why: gloo's worker threads free each collective some time after it completed, and freeing one whose
    saved torch state holds Python objects (DDP's gradient all-reduces, since torch 2.13) takes the GIL.
    When the process group outlives the script's last collective (a DDP model still holds it, so
    `destroy_process_group` leaves its threads running), such a thread can still be freeing collectives
    when the interpreter finalizes; CPython then ends the thread inside a C++ destructor and the process
    aborts ("terminate called without an active exception"), about 1 exit in 10-50 with DDP here. distrib's
    own scope waits for those threads (`_scope.close_process_group`); a script that uses torch.distributed
    directly gets this instead.

    When torch.distributed was imported and no other non-daemon thread is alive (otherwise the normal
    exit, which waits for them, happens), this does what the normal exit would, in the same order: the
    atexit handlers run, the script's globals are released (their finalizers run, open files are flushed
    and closed), and every file still open anywhere is flushed; then `os._exit` with the status Python
    would give.
    """
    if "torch.distributed" not in sys.modules:
        return
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        return
    atexit._run_exitfuncs()  # before the globals go: handlers may use them, as at a normal exit
    for namespace in _script_globals:
        namespace.clear()
    gc.collect()
    status = _exit_status(code)
    _flush_open_files()
    os._exit(status)


def _status(code: Any) -> int:
    """The exit status `raise SystemExit(code)` gives a Python process."""
    if code is None:
        return 0
    return code & 0xFF if isinstance(code, int) else 1


def _exit_status(code: Any) -> int:
    """The exit status `raise SystemExit(code)` gives a Python process (a message is printed, status 1)."""
    if code is None or isinstance(code, int):
        return _status(code)
    try:
        print(code, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
    return 1


def _flush_open_files() -> None:
    """Flush every open writable file object, as their finalizers would at a normal exit."""
    kinds = (io.TextIOWrapper, io.BufferedWriter, io.BufferedRandom)
    for obj in gc.get_objects():
        if type(obj) in kinds:  # exact types: cheap, and no isinstance hooks run
            try:
                if not obj.closed:
                    obj.flush()
            except (OSError, ValueError):
                pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass


def _record(exc: BaseException) -> None:
    """Write the exception to the agent's error file (a no-op when not started by an agent)."""
    try:
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler
    except ImportError:  # pragma: no cover - torch is a dependency
        return
    get_error_handler().record_exception(exc)


if __name__ == "__main__":
    main()
