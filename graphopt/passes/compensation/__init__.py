"""Low-rank error compensation (EoRA) for layers another lossy pass changed; no pass of its own.

Importing this package stays cheap (every run registers every pass): the numerics are in
:mod:`.eora` (Conv paths: :mod:`.conv`; re-rounding with the path in view: :mod:`.joint`),
imported only when a pass is asked for a compensation.
"""

from graphopt.registry import PassOption

# The one declaration of ``--compensation``, listed by prune, factorize, sparsify and quantize
# (one flag sets all of them, as --calib). Each pass checks the values it takes: prune
# none|bias|lsq (passing eora:R over with a note), the others none|eora:RANK (passing
# pruning's values over with a note); hence no argparse choices here.
COMPENSATION_OPTION = PassOption(
    "compensation",
    str,
    None,
    "prune: refit consumer layers from calibration data, none|bias|lsq (default: lsq "
    "with a --calib file, else none); factorize/sparsify/quantize: none|eora:RANK (a float32 "
    "rank-RANK path per changed MatMul/Gemm/Conv fitted to its calibration inputs, the layer "
    "re-rounded with it in view where the pass's rounding can be rerun; needs --calib)",
    flag="--compensation",
    metavar="none|bias|lsq|eora:RANK",
)
