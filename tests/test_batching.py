"""flowjax.rl.batching: gradient calls of a minibatch combine into what one call over it gives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from flowjax import sharding
from flowjax.rl.batching import micro_batched, minibatch_layout
from flowjax.rl.method import Cond


def weighted_grads(ctx, params, state, mb, window, key):
    """A weighted least-squares gradient with a mean, a max and a min metric over the rows of weight > 0."""
    w, x = mb["weights"], mb["x"] + mb["cond"].pooled[:, 0]
    resid = params["a"] * x - 1.0
    g = {"a": jnp.sum(w * resid * x) / w.sum()}
    kept = w > 0
    return g, {"loss": jnp.sum(w * resid**2) / w.sum(), "x_max": jnp.max(jnp.where(kept, x, -jnp.inf)),
               "x_min": jnp.min(jnp.where(kept, x, jnp.inf))}


@pytest.mark.parametrize("calls", [2, 3])
def test_calls_combine_into_the_whole_minibatch(calls):
    """Gradients and means as weighted means of the calls, `*_max` / `*_min` as extremes over the calls, on 2
    data-parallel devices, with the minibatch padded as the trainer pads it (weight-0 rows at its end)."""
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:2])
    rows = 2 * calls * 3  # 3 rows per device per call
    size = rows - 2  # the last 2 rows are padding of weight 0 (with extreme values that must not count)
    layout = minibatch_layout(size, 1, 2, micro=3)
    assert layout == (size, rows, calls)
    x = np.linspace(-1.0, 2.0, rows).astype(np.float32)
    x[size:] = [50.0, -50.0]
    w = np.r_[np.ones(size), np.zeros(rows - size)].astype(np.float32)
    mb = {"x": jnp.asarray(x), "weights": jnp.asarray(w),
          "cond": Cond(jnp.zeros((rows, 4)), jnp.full((rows, 2), 0.25), jnp.zeros((4,)), jnp.zeros((2,)))}
    params = {"a": jnp.float32(0.7)}
    spread = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp")))
    g_whole, m_whole = weighted_grads(None, params, None, mb, None, None)
    g, m = jax.jit(micro_batched(weighted_grads, 2, calls, spread))(None, params, None, mb, None, None)
    np.testing.assert_allclose(float(g["a"]), float(g_whole["a"]), rtol=1e-6)
    for k in ("loss", "x_max", "x_min"):
        np.testing.assert_allclose(float(m[k]), float(m_whole[k]), rtol=1e-6, err_msg=k)
    assert float(m["x_max"]) == x[:size].max() + 0.25 and float(m["x_min"]) == x[:size].min() + 0.25
    assert not bool(m["skip"])


def test_timestep_accumulation_reduces_metrics_as_the_calls_do():
    """`method.accumulate` over K timesteps: the gradient and means weighted over the steps of weight > 0,
    `*_max` / `*_min` the extremes of those steps (a left-out step's extreme values do not count), 0 when every
    step is left out."""
    from flowjax.rl.method import accumulate

    steps = jnp.asarray([0.5, 3.0, -2.0, 9.0])
    loss_fn = lambda p, s: ((p * s) ** 2, {"loss": (p * s) ** 2, "s_max": s, "s_min": s})
    w = jnp.asarray([1.0, 1.0, 1.0, 0.0])  # the last step (9.0) is left out
    g, m = accumulate(loss_fn, jnp.float32(2.0), steps, w)
    np.testing.assert_allclose(float(g), np.mean([2 * 2.0 * s**2 for s in (0.5, 3.0, -2.0)]), rtol=1e-6)
    np.testing.assert_allclose(float(m["loss"]), np.mean([(2.0 * s) ** 2 for s in (0.5, 3.0, -2.0)]), rtol=1e-6)
    assert float(m["s_max"]) == 3.0 and float(m["s_min"]) == -2.0
    g, m = accumulate(loss_fn, jnp.float32(2.0), steps, jnp.zeros(4))
    assert float(g) == 0.0 and all(float(v) == 0.0 for v in m.values())
