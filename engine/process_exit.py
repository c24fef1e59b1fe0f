"""Ending a process that imported torch without tearing torch down.

Freeing the thousands of modules torch and transformers import takes 1-1.6 s at interpreter exit on two cores,
after the answer is printed (and, for a subprocess, before its parent sees end of file). Such a process ends with
os._exit instead, once its output is flushed and its exit handlers (the live run's worker sweep among them) have
run. One with other non-daemon threads still running exits normally, which waits for them.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading


def exit_process(code: int) -> None:
    """Exit with `code`: at once where torch was imported and nothing else is running, else as sys.exit does."""
    others = [thread for thread in threading.enumerate()
              if thread is not threading.main_thread() and not thread.daemon]
    if "torch" not in sys.modules or others:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said on it
            pass
    atexit._run_exitfuncs()
    os._exit(code)
