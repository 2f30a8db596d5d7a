"""How an epoch's rows become gradient calls: minibatches padded to the mesh, micro-batched gradient calls
combined by their weights, and gradient-accumulation windows that never cross an epoch."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from flowjax.rl.method import Cond, reduce_metric


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


def minibatch_layout(rows: int, minibatches: int, devices: int, micro: int = 0,
                     unit: int = 1) -> tuple[int, int, int]:
    """(rows per minibatch, padded rows per minibatch, gradient calls per minibatch). A minibatch is padded with
    rows of weight 0 to a multiple of the data-parallel devices, so the published minibatch sizes run on any mesh
    with the weighted means of their real rows. With `train.micro_batch` = `micro` rows per device (a multiple of
    the method's `unit`), a device's rows go in the fewest calls of at most `micro` rows, and those calls share
    its rows evenly (in multiples of `unit`): 24 rows per device at micro 18 make 2 calls of 12, not 2 of 18 with
    12 rows of padding. The padding stays under one row per device per call (under one `unit`)."""
    size = rows // minibatches
    per_device = -(-size // devices)
    if not micro or micro >= per_device:
        return size, per_device * devices, 1
    calls = -(-per_device // micro)
    per_call = -(-per_device // (calls * unit)) * unit  # <= micro: micro is a multiple of unit
    return size, per_call * calls * devices, calls


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
    into the minibatch's (a call is skipped only when the method skips all of them; metrics by
    `method.reduce_metric`: `*_max` / `*_min` as extremes over the calls, the others as weighted means)."""
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
            g_acc, s_acc = carry
            g_acc = jax.tree.map(lambda a, b: a + w * b.astype(a.dtype), g_acc, g)
            return (g_acc, s_acc & skip), (jax.tree.map(lambda m: m.astype(jnp.float32), metrics), w)

        init = (jax.tree.map(jnp.zeros_like, params), jnp.ones((), bool))
        (g, skip), (metrics, w) = jax.lax.scan(body, init, parts)
        total = jnp.maximum(w.sum(), 1e-12)
        metrics = {k: reduce_metric(k, m, w) for k, m in metrics.items()}
        return jax.tree.map(lambda x: x / total.astype(x.dtype), g), {**metrics, "skip": skip}

    return minibatch_grads
