"""xopt: a compiler-style graph optimizer for transformer models.

import xopt
model = xopt.load("model.onnx")              # or an HF folder, .pt2, nn.Module, ExportedProgram
optimized, report = xopt.optimize(model)     # the "exact" recipe, verified after every pass
xopt.save(optimized, "out/")                 # written atomically, loaded back in ONNX Runtime
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx_ir as ir

from xopt.capture import load
from xopt.errors import XoptError, require_model
from xopt.pipeline import RECIPES, Pass, PassManager, PassResult, register, registered_passes, resolve_passes
from xopt.report import Report
from xopt.saving import save

__all__ = [
    "RECIPES",
    "Pass",
    "PassManager",
    "PassResult",
    "Report",
    "XoptError",
    "analyze",
    "load",
    "optimize",
    "register",
    "registered_passes",
    "save",
]
__version__ = "0.1.0"


def optimize(
    model: ir.Model,
    recipe: str | None = None,
    passes: str | Iterable[str | Pass] | None = None,
    verify: bool = True,
) -> tuple[ir.Model, Report]:
    """Run a recipe (default `exact`) or `passes` on a copy of `model`; the input is untouched."""
    require_model("optimize", model)
    if recipe is not None and passes is not None:
        raise XoptError("give a recipe or passes, not both")
    return PassManager(resolve_passes(recipe, passes), verify=verify)(model)


def analyze(model: ir.Model):
    """The transformer structure of `model` (see `xopt.analysis.find_transformer_structure`)."""
    from xopt.analysis import find_transformer_structure

    require_model("analyze", model)
    return find_transformer_structure(model)
