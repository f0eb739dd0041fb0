"""Worker bootstrap: `python -m distrib._cli.worker [--module] TARGET [ARGS...]`.

Runs the user's script (or module) as `__main__`, exactly as `python script.py` would, and when it raises
records the exception in the error file torch's elastic agent gave this worker
(`TORCHELASTIC_ERROR_FILE`, written by torch's own `ErrorHandler`), so the launcher can report the
traceback of the rank that failed without the user adding `@record` to their code. Only the standard
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
import os
import runpy
import sys
import threading
import types
from importlib.machinery import ModuleSpec
from typing import Any


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    is_module = bool(args) and args[0] == "--module"
    if is_module:
        args = args[1:]
    if not args:
        raise SystemExit("usage: python -m distrib._cli.worker [--module] TARGET [ARGS...]")
    faulthandler.enable(all_threads=True)
    try:
        namespace = run(args[0], args[1:], is_module=is_module)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:
        _record(exc)
        raise
    _finish(namespace)


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
    with open(target, "rb") as source:
        code = compile(source.read(), target, "exec")
    return _exec_as_main(code, target, spec=None, package=None)


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
    exec(code, module.__dict__)
    return module.__dict__


def _finish(namespace: dict[str, Any]) -> None:
    """Exit 0 after a script that completed, without letting C++ teardown turn success into a crash.

    With gloo, a finished worker sometimes aborts in C++ static destruction at interpreter exit
    ("terminate called without an active exception", about 1 exit in 10 here, after all Python code
    ran), and the agent then reports a failed run. When torch.distributed was used and no other
    non-daemon thread is alive, this runs what a normal exit would (atexit handlers run, the script's
    objects are released, streams are flushed) and then leaves with `os._exit(0)`, skipping only the
    C++ destructors. In any other case the interpreter exits normally.
    """
    if "torch.distributed" not in sys.modules:
        return
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        return
    atexit._run_exitfuncs()  # before the globals go: handlers may use them, as at a normal exit
    namespace.clear()  # the script's objects are finalised (open files flushed and closed)
    gc.collect()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


def _record(exc: BaseException) -> None:
    """Write the exception to the agent's error file (a no-op when not started by an agent)."""
    try:
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler
    except ImportError:  # pragma: no cover - torch is a dependency
        return
    get_error_handler().record_exception(exc)


if __name__ == "__main__":
    main()
