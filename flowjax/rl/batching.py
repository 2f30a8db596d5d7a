"""How an epoch's rows become gradient calls: minibatches padded to the mesh, micro-batched gradient calls
combined by their weights, and gradient-accumulation windows that never cross an epoch."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from flowjax.rl.method import Cond


def sample_micro_rows(batch: int, devices: int, micro: int) -> int:
    """Rows per rollout / reward / evaluation call for `sample.micro_batch` = `micro` rows per device: 0 (the
    whole batch in one call) when micro is 0 or covers the batch; a ValueError listing the valid sizes when
    micro x devices does not divide the batch (calls are never padded: every sampled row is a real rollout)."""
    rows = micro * devices if micro and micro * devices < batch else 0
    if micro < 0 or (rows and batch % rows):
        per = batch // devices
        sizes = [d for d in range(1, per + 1) if per % d == 0]
        raise ValueError(f"sample.micro_batch={micro} rows per device must divide the batch's {per} rows per "
                         f"device (over {devices} devices); choose one of {sizes}, or 0 for the whole batch in one "
                         "call")
    return rows


def minibatch_layout(rows: int, minibatches: int, devices: int, micro: int = 0) -> tuple[int, int, int]:
    """(rows per minibatch, padded rows per minibatch, gradient calls per minibatch). A minibatch is padded with
    rows of weight 0 to a multiple of the data-parallel devices (of devices x `micro` rows with
    `train.micro_batch`), so the published minibatch sizes run on any mesh with the weighted means of their
    real rows; the padding is under one row per device (per call)."""
    size = rows // minibatches
    unit = devices * micro if micro and micro * devices < size else devices
    padded = -(-size // unit) * unit
    return size, padded, padded // unit if unit > devices else 1


def accumulate_window(acc, grads, finite, every: int):
    """One minibatch into a gradient-accumulation window of `every` minibatches.

    acc = (sum of finite gradients, number of finite minibatches, minibatches seen) of the open window.
    Returns (new acc, do_step, mean): at the window's last minibatch `do_step` is True when at least one
    minibatch was finite, `mean` the mean of the finite ones (a non-finite minibatch is left out, not
    averaged in as 0), and the window closes (acc back to zeros) whether or not it steps. So windows are
    always `every` minibatches long and, with minibatches % every == 0, never cross an epoch.
    """
    g_sum, count, seen = acc
    g_sum = jax.tree.map(lambda a, g: a + jnp.where(finite, g, 0.0).astype(a.dtype), g_sum, grads)
    count, seen = count + jnp.asarray(finite, jnp.int32), seen + 1
    boundary = seen == every
    mean = jax.tree.map(lambda g: g / jnp.maximum(count, 1).astype(g.dtype), g_sum)
    reset = lambda x: jnp.where(boundary, jnp.zeros_like(x), x)
    return (jax.tree.map(reset, g_sum), reset(count), reset(seen)), boundary & (count > 0), mean


def micro_batched(grads: Callable, devices: int, calls: int, spread) -> Callable:
    """A method's `grads(ctx, params, method_state, minibatch, window, key)` over a minibatch in `calls`
    gradient calls (`train.micro_batch`): each call takes its rows from every one of the data-parallel
    `devices` alike (`spread`: the sharding of the [calls, rows] split), and the calls' weighted means combine
    into the minibatch's (a call is skipped only when the method skips all of them)."""
    if calls == 1:
        return grads

    def minibatch_grads(ctx, params, method_state, mb, window, key):
        cond = mb["cond"]
        split = lambda x: jax.lax.with_sharding_constraint(
            x.reshape(devices, calls, -1, *x.shape[1:]).swapaxes(0, 1).reshape(calls, -1, *x.shape[1:]), spread)
        parts = jax.tree.map(split, ({k: v for k, v in mb.items() if k != "cond"}, (cond.ctx, cond.pooled)))

        def one(part):
            rows, (ctx_, pooled) = part
            return grads(ctx, params, method_state,
                         {**rows, "cond": Cond(ctx_, pooled, cond.neg_ctx, cond.neg_pooled)}, window, key)

        def body(carry, part):
            g, metrics = one(part)
            skip = metrics.pop("skip", jnp.zeros((), bool))
            w = part[0]["weights"].sum()
            g_acc, m_acc, w_acc, s_acc = carry
            add = lambda a, b: a + w * b.astype(a.dtype)
            return (jax.tree.map(add, g_acc, g), jax.tree.map(add, m_acc, metrics), w_acc + w, s_acc & skip), None

        shapes = jax.eval_shape(one, jax.tree.map(lambda x: x[0], parts))[1]
        shapes.pop("skip", None)
        zeros = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)
        init = (jax.tree.map(jnp.zeros_like, params), zeros(shapes), jnp.zeros(()), jnp.ones((), bool))
        (g, metrics, w, skip), _ = jax.lax.scan(body, init, parts)
        w = jnp.maximum(w, 1e-12)
        return jax.tree.map(lambda x: x / w.astype(x.dtype), g), {**jax.tree.map(lambda m: m / w, metrics),
                                                                    "skip": skip}

    return minibatch_grads
