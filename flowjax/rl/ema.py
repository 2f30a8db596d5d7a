"""Exponential moving averages of parameter pytrees: the old / KL-EMA policies of DiffusionNFT and AWM, and
every method's EMA evaluation copy."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flowjax.rl.method import EvalEMA


def eval_ema_decay(step, decay: float):
    """Decay of the evaluation EMA (flow_grpo/ema.py `EMAModuleWrapper.get_current_decay`).

    min((1 + step) / (10 + step), decay); the wrapper updates when (step + 1) % interval == 0.
    Published: Flow-GRPO decay 0.9 interval 8, AWM 0.99 interval 1, DiffusionNFT 0.9 interval 1.
    """
    s = jnp.asarray(step, jnp.float32)
    return jnp.minimum((1.0 + s) / (10.0 + s), jnp.float32(decay))


def ema_update(old_params, params, decay):
    """old * decay + params * (1 - decay), leaf by leaf over matching pytrees.

    Computed in float32 and cast back to each old leaf's dtype; no gradient flows. Leaves that
    are not floating point (e.g. counters) are taken from `params`.
    """
    d = jnp.asarray(decay, jnp.float32)

    def one(o, p):
        o, p = jnp.asarray(o), jnp.asarray(p)
        if not jnp.issubdtype(o.dtype, jnp.floating):
            return p
        new = o.astype(jnp.float32) * d + jax.lax.stop_gradient(p).astype(jnp.float32) * (1.0 - d)
        return new.astype(o.dtype)

    return jax.tree_util.tree_map(one, old_params, params)


def eval_ema_step(ema_params, params, spec: EvalEMA, opt_step):
    """One call of the references' EMAModuleWrapper.step(params, optimization_step=opt_step): the update
    `ema_update(ema, params, eval_ema_decay(opt_step, decay))` when (opt_step + 1) % every == 0, else no change
    (flow_grpo `flow_grpo/ema.py`, ac4c86e). `opt_step` may be traced."""
    s = jnp.asarray(opt_step, jnp.int32)
    due = (s + 1) % spec.every == 0
    new = ema_update(ema_params, params, eval_ema_decay(s, spec.decay))
    return jax.tree.map(lambda n, o: jnp.where(due, n, o), new, ema_params)
