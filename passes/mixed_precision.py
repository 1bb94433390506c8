"""Mixed precision by sensitivity: which linears keep a higher precision (and which of their
quantized forms each takes) so that the quantized model's task error stays within a budget.

Each linear i has candidate quantized forms c ∈ C_i (e.g. int8 with and without smoothing) and a
higher-precision fallback. With E(plan) the task error (`xopt.task_error`) of the model built
from a plan (a form or the fallback for every linear):

1. sensitivity: e_i = min_c E(i in form c, every other linear at its fallback) — the error of
   quantizing linear i alone — and c_i the form reaching it (the forms are compared where it
   counts, on the task, not on the layer's own output error);
2. E(all in their forms c_i) is measured; within the budget, nothing is protected;
3. otherwise linears are protected (set to their fallback) in decreasing order of e_i, taking
   the shortest prefix P whose estimate E(∅)·Σ_{i∉P} e_i / Σ_i e_i is within the budget
   (errors taken as additive, scaled so that the estimate of ∅ is the measured E(∅));
4. E(P) is measured, and while it exceeds the budget the next linear is protected as well.

Protecting every linear ends the search (for int8 that is the float model, E = 0; for int4
every linear at 8 bits, which may still exceed a tight budget: the explanation says so).
Cost: Σ_i |C_i| candidates plus a few, each one ONNX Runtime session and one pass over the
calibration feeds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Mapping, Sequence

import onnx_ir as ir

from xopt.progress import progress

logger = logging.getLogger(__name__)

Plan = dict[str, Hashable]  # linear name → the form it takes (a fallback included)


def protect_by_sensitivity(
    forms: Mapping[str, Sequence[Hashable]],
    fallback: Mapping[str, Hashable],
    build: Callable[[Plan], ir.Model],
    task_error: Callable[[ir.Model], float],
    budget: float,
    explain: list[str],
    unit: str,
) -> Plan:
    """The plan to lower: each linear's best form, or its fallback where it must be protected."""
    names = list(forms)
    sensitivity, best = {}, {}
    for index, name in enumerate(progress(names, unit="linear", description="sensitivity")):
        for form in forms[name]:
            error = task_error(build({**fallback, name: form}))
            if name not in sensitivity or error < sensitivity[name]:
                sensitivity[name], best[name] = error, form
        logger.info("sensitivity %d/%d %s: %.3g", index + 1, len(names), name, sensitivity[name])
    order = sorted(names, key=lambda name: -sensitivity[name])
    full = task_error(build(best))
    explain.append(f"mixed precision: all quantized: task error {full:.3g} {unit} (budget {budget:g})")
    total = sum(sensitivity.values()) or 1.0
    remaining, count = total, 0
    while count < len(order) and full * remaining / total > budget:
        remaining -= sensitivity[order[count]]
        count += 1
    while True:
        protected = set(order[:count])
        plan = {name: fallback[name] if name in protected else best[name] for name in names}
        measured = full if count == 0 else task_error(build(plan))
        if measured <= budget or count == len(order):
            break
        count += 1
    for name in order[:count]:
        explain.append(f"mixed precision: {name} kept at higher precision (alone: {sensitivity[name]:.3g} {unit})")
    explain.append(f"mixed precision: {count} of {len(names)} linears protected: task error {measured:.3g} {unit}")
    if measured > budget:
        explain.append("mixed precision: the budget is not met even with every linear at the higher precision")
    return plan
