"""Low-rank error compensation (EoRA) for layers another lossy pass changed; no pass of its own.

Importing this package stays cheap (every run registers every pass): the numerics are in
:mod:`.eora` (Conv paths: :mod:`.conv`; re-rounding with the path in view: :mod:`.joint`;
paths after pruning: :mod:`.pruned`), imported only when a pass is asked for a compensation.
"""

from graphopt.registry import PassOption

# The one declaration of ``--compensation``, listed by prune, factorize, sparsify and quantize
# (one flag sets all of them, as --calib). Each pass checks the values it takes: prune
# none|bias|lsq|eora:R (eora:R: its default refit plus rank-R paths from each pruned block's
# input, :mod:`.pruned`), the others none|eora:RANK (passing pruning's values over with a
# note); hence no argparse choices here.
COMPENSATION_OPTION = PassOption(
    "compensation",
    str,
    None,
    "prune: refit consumer layers from calibration data, none|bias|lsq (default: lsq "
    "with a --calib file, else none), or eora:RANK (the default refit plus a rank-RANK path "
    "from each pruned MatMul/Gemm block's input to its output layer); factorize/sparsify/"
    "quantize: none|eora:RANK (a float32 rank-RANK path per changed MatMul/Gemm/Conv fitted "
    "to its calibration inputs, the layer re-rounded with it in view where the pass's "
    "rounding can be rerun); eora needs --calib",
    flag="--compensation",
    metavar="none|bias|lsq|eora:RANK",
)
