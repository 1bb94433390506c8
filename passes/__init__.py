"""The built-in passes (installed as `xopt.passes`); importing this package registers them.

Every pass is callable alone on an `ir.Model`:

    from xopt.passes import CleanupPass
    result = CleanupPass()(model)
"""

from xopt.passes.cleanup import CleanupPass
from xopt.passes.fold_norms import FoldNormsPass
from xopt.passes.fuse import FusePass
from xopt.passes.keep_grids import KeepGridsPass
from xopt.passes.last_token_logits import LastTokenLogitsPass
from xopt.passes.low_rank import LowRankPass
from xopt.passes.prune_layers import PruneLayersPass
from xopt.passes.prune_width import PruneWidthPass
from xopt.passes.quantize import QuantizeWeightsPass
from xopt.passes.rotate import RotatePass

__all__ = [
    "CleanupPass",
    "FoldNormsPass",
    "FusePass",
    "KeepGridsPass",
    "LastTokenLogitsPass",
    "LowRankPass",
    "PruneLayersPass",
    "PruneWidthPass",
    "QuantizeWeightsPass",
    "RotatePass",
]
