"""Test helper, run as a subprocess: ``engram run`` of an experiment whose process kills
itself with SIGKILL right after the N-th store write (traces committed, the session's probes
not yet scored: the middle of a session)."""

import os
import signal
import sys

from engram.store_memory import StoreMemory
from sessions import cli

kill_after = int(sys.argv[1])
calls = 0
original = StoreMemory.write


def write_then_die(self, *args, **kwargs):
    global calls
    ids = original(self, *args, **kwargs)
    calls += 1
    if calls == kill_after:
        self.store.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return ids


StoreMemory.write = write_then_die
sys.exit(cli.main(sys.argv[2:]))
