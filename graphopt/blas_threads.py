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
from collections.abc import Iterator

# The count passes run numpy's BLAS with, recorded nowhere: it is fixed, not measured.
PASS_BLAS_THREADS = 1


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """numpy's BLAS (and any other BLAS loaded, e.g. torch's MKL) on one thread inside."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=PASS_BLAS_THREADS, user_api="blas"):
        yield
