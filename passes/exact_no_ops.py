"""Rewrite rules that remove arithmetic no-ops only where they are exact: x + 0, 0 + x, x − 0,
x · 1, 1 · x and x / 1 → x, with the constant a scalar exactly 0 or 1.

onnxscript's own no-op rules compare the constant with a tolerance (absolute 1e-8, relative
1e-5), so they also drop x + 1e-8 (an RMSNorm's ε, Helium's: a zero row then normalises to
0 · ∞ = NaN) and x · 1.000001. These replace them in `cleanup`; the Dropout rules are kept.
"""

from __future__ import annotations

from onnxscript.rewriter import RewriteRule, RewriteRuleSet
from onnxscript.rewriter.rules.common import _no_op, dropout_inference_rule, dropout_zero_rule

from xopt.analysis.graph_view import const_array

APPROXIMATE_NO_OP_RULES = frozenset(_no_op.rules.rules)


def _add(op, x, constant):
    return op.Add(x, constant)


def _sub(op, x, constant):
    return op.Sub(x, constant)


def _mul(op, x, constant):
    return op.Mul(x, constant)


def _div(op, x, constant):
    return op.Div(x, constant)


def _identity(op, x, **_):
    return op.Identity(x)


def _scalar_equal_to(expected: float):
    def condition(context, x, constant, **_) -> bool:
        array = const_array(constant)
        return array is not None and array.ndim == 0 and array.item() == expected

    return condition


EXACT_NO_OP_RULES = RewriteRuleSet(
    [
        *RewriteRule(_add, _identity, _scalar_equal_to(0)).commute(),
        RewriteRule(_sub, _identity, _scalar_equal_to(0)),
        *RewriteRule(_mul, _identity, _scalar_equal_to(1)).commute(),
        RewriteRule(_div, _identity, _scalar_equal_to(1)),
        dropout_zero_rule,
        dropout_inference_rule,
    ]
)
