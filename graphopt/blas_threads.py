"""numpy's BLAS held to one thread while passes run, so that the output is the same on every
machine.

OpenBLAS (what numpy's wheels bundle) splits some products across its threads in ways that
change the float32 rounding of sums with the thread count. The data-aware passes compute
statistics with numpy (Gram matrices, activation-weighted norms, least-squares fits), and a
last-bit difference there moved weights and even flipped which weights 2:4 sparsity kept on
MobileNetV3-Small, between OMP_NUM_THREADS=1 and 2. One thread gives every machine the same
sums, whatever its core count. ONNX Runtime's CPU kernels gave bit-identical outputs at 1, 2,
3 and 8 threads on the models checked (MobileNetV3, BERT-tiny), so sessions keep their
threads: most of a pass's time is spent in them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

# The count passes run numpy's BLAS with, recorded nowhere: it is fixed, not measured.
PASS_BLAS_THREADS = 1


# threadpoolctl's limits are process-wide, while optimize() may run in several threads at
# once: the limit is one for the process, counted. The first run to enter sets it, the last to
# leave restores what the process had; runs that overlap in any order keep one thread between.
# (Limits taken and restored by each run, in the order runs end, gave a run's remaining passes
# the caller's threads back when another run returned first, and left one thread after both.)
_lock = threading.Lock()
_users = 0
_limits: Any = None  # threadpoolctl's limiter while anyone is inside


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """numpy's BLAS (and any other BLAS loaded, e.g. torch's MKL) on one thread inside."""
    global _users, _limits
    from threadpoolctl import threadpool_limits

    with _lock:
        if _users == 0:
            _limits = threadpool_limits(limits=PASS_BLAS_THREADS, user_api="blas")
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                limits, _limits = _limits, None
                limits.restore_original_limits()
