"""The child process :mod:`.isolated` runs TensorRT's parser and builder in.

``python -m graphopt.backends.tensorrt.child FD``: FD is a connection to graphopt, which
sends ``sys.path`` (a test's own module may be the target), then ``(target, args)``; the
child runs ``target(connection, *args)`` and exits.
"""

from __future__ import annotations

import os
import signal
import sys
from multiprocessing.connection import Connection


def main(fd: int) -> None:
    # Ctrl-C reaches the whole process group: graphopt handles it and ends this child.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # What native code prints goes to stderr: graphopt's stdout may be JSON (lint --json).
    os.dup2(2, 1)
    conn = Connection(fd)
    sys.path[:] = conn.recv()
    target, args = conn.recv()
    target(conn, *args)


if __name__ == "__main__":
    main(int(sys.argv[1]))
