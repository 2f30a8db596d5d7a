"""Matmul and convolution FLOPs of a JAX function, counted from its jaxpr (for `flowjax.plan`'s roofline).

XLA's `cost_analysis()` counts the body of a loop once, so a sampler that scans its steps and a transformer that
scans its blocks report a small fraction of their work. This counts each `dot_general` (2 x batch x M x N x K)
and `conv_general_dilated` (2 x output elements x kernel elements per output channel / groups) and multiplies
the body of a `scan` by its length; nested calls (jit, remat, custom derivatives) count once per call, a `cond`
its most expensive branch. Elementwise work is left out, as in the usual model-FLOPs-utilisation convention.
A `while` loop's trip count is not known from its jaxpr: its body is counted once, and `uncounted_loops`
reports how many such loops were met, so a caller can say so.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.extend import core as jex_core


@dataclasses.dataclass
class FlopCount:
    flops: float = 0.0
    uncounted_loops: int = 0

    def add(self, other: "FlopCount", times: float = 1.0) -> None:
        self.flops += other.flops * times
        self.uncounted_loops += other.uncounted_loops


def _dot_flops(eqn) -> float:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    contract = math.prod(lhs[d] for d in lc)
    batch = math.prod(lhs[d] for d in lb)
    lhs_free = math.prod(s for d, s in enumerate(lhs) if d not in lc and d not in lb)
    rhs_free = math.prod(s for d, s in enumerate(rhs) if d not in rc and d not in rb)
    return 2.0 * batch * lhs_free * rhs_free * contract


def _conv_flops(eqn) -> float:
    dn = eqn.params["dimension_numbers"]
    rhs = eqn.invars[1].aval.shape
    out = eqn.outvars[0].aval.shape
    # kernel elements feeding one output element: input features per group x spatial window
    in_per_group = rhs[dn.rhs_spec[1]]
    window = math.prod(rhs[d] for d in dn.rhs_spec[2:])
    return 2.0 * math.prod(out) * in_per_group * window


def _sub_jaxprs(eqn):
    for v in eqn.params.values():
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(x, jex_core.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jex_core.Jaxpr):
                yield x


def count_jaxpr(jaxpr) -> FlopCount:
    total = FlopCount()
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total.flops += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total.flops += _conv_flops(eqn)
        elif name == "scan":
            total.add(count_jaxpr(eqn.params["jaxpr"].jaxpr), eqn.params["length"])
        elif name == "cond":
            branches = [count_jaxpr(b.jaxpr) for b in eqn.params["branches"]]
            total.add(max(branches, key=lambda c: c.flops))
        elif name == "while":
            total.add(count_jaxpr(eqn.params["body_jaxpr"].jaxpr))
            total.add(count_jaxpr(eqn.params["cond_jaxpr"].jaxpr))
            total.uncounted_loops += 1
        else:
            for sub in _sub_jaxprs(eqn):
                total.add(count_jaxpr(sub))
    return total


def count(fn, *args) -> FlopCount:
    """FLOPs of `fn(*args)` (arrays or `jax.ShapeDtypeStruct`s) over the whole (global) batch."""
    return count_jaxpr(jax.make_jaxpr(fn)(*args).jaxpr)
