"""What a multi-process `distributed()` scope runs so that a run never hangs or fails without a word:
the collective ledger, the stall watchdog, debug mode and the straggler report.

`open_scope` is called once when a scope opens; it registers the scope's closer, which on a normal exit
runs the "leave the scope" collective (a rank that leaves while the others still call collectives is
named, on every rank) and on an exception puts the reason in the store, so the ranks left waiting say
why their peer is gone.
"""

from __future__ import annotations

import os
import sys
import traceback
from types import TracebackType

from . import _debug_collectives, _store, _straggler
from ._agreement import ledger_of
from ._collectives import leave_scope
from ._diagnosis import innermost_user_frame
from ._environment import diagnostics_directory
from ._ledger import Ledger, Site, op_call, user_frame
from ._runtime import Runtime, current_or_none
from ._watchdog import Watchdog
from .errors import CollectiveError


def open_scope(runtime: Runtime) -> None:
    """Start the checks of a scope that is about to become current (call it before pushing it)."""
    if runtime.world_size == 1:
        return
    outer = current_or_none()
    inherited = (
        outer is not None and outer.world_size == runtime.world_size and "ledger" in outer.state.extensions
    )
    if inherited:
        assert outer is not None
        ledger: Ledger = outer.state.extensions["ledger"]  # a nested scope shares its group's agreed state
    else:
        ledger = Ledger(runtime.rank, runtime.world_size, debug=runtime.settings.debug_collectives)
        frame = user_frame(sys._getframe(1))
        code = frame.f_code
        ledger.opened_at = Site(code.co_filename, frame.f_lineno, getattr(code, "co_qualname", code.co_name))
    runtime.state.extensions["ledger"] = ledger
    watchdog = None
    if runtime.settings.stall_timeout is not None and not inherited:
        watchdog = Watchdog(runtime, ledger, runtime.settings.stall_timeout, diagnostics_directory())
        watchdog.start()
    debug = runtime.settings.debug_collectives
    if debug:
        _debug_collectives.install()
    debug_before = ledger.debug
    ledger.debug = debug_before or debug  # a nested debug scope checks every call of the shared ledger
    _straggler.start(runtime)

    def close() -> None:
        try:
            _close(runtime, owner=not inherited, watchdog=watchdog, debug=debug)
        finally:
            ledger.debug = debug_before

    runtime.state.closers.append(close)


def _close(runtime: Runtime, *, owner: bool, watchdog: Watchdog | None, debug: bool) -> None:
    exc = sys.exc_info()[1]
    try:
        if exc is None and owner:
            leave_scope(runtime)  # raises on every rank when some rank is still in another collective
    except BaseException as error:
        exc = error
        raise
    finally:
        if watchdog is not None:
            watchdog.stop()
        if exc is not None:
            publish_exit(runtime, exc, counted_idle=watchdog is not None and watchdog.idle)
        if debug:
            _debug_collectives.uninstall()


def publish_exit(runtime: Runtime, exc: BaseException, *, counted_idle: bool = False) -> None:
    """Tell the other ranks, through the store, why this rank leaves the run (best effort)."""
    store = _store.group_store()
    ledger = ledger_of(runtime)
    where = _where(exc.__traceback__)
    if isinstance(exc, SystemExit):
        reason = f"it called sys.exit({exc.code!r}){where}"
    elif isinstance(exc, KeyboardInterrupt):
        reason = f"it was interrupted (KeyboardInterrupt){where}"
    elif isinstance(exc, CollectiveError):
        reason = f"it stopped with {type(exc).__name__}{where} (its output has the details)"
    else:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        reason = f"it raised {type(exc).__name__}{': ' + text[:300] if text else ''}{where}"
    last = list(ledger.entries)[-1:]
    after = (
        f"after collective #{last[0][0]}: {op_call(last[0][1].op)} at {last[0][1].site}"
        if last
        else "before any collective"
    )
    _store.put(store, f"left/{runtime.rank}", {"rank": runtime.rank, "reason": reason, "last": after})
    if not counted_idle:
        _store.add(store, "watchdog/idle", 1)  # a rank that left never makes progress again


def _where(tb: TracebackType | None) -> str:
    stack = [
        {"file": os.path.abspath(f.filename), "line": f.lineno, "function": f.name}
        for f in traceback.extract_tb(tb)
    ]
    frame = innermost_user_frame(stack)
    return f" at {frame['file']}:{frame['line']}" if frame else ""
