"""The clean-sample parameterisation (flowjax.models.prediction): closed-form checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowjax import sampling
from flowjax.models.prediction import MIN_SIGMA, to_velocity


def test_velocity_prediction_passes_through():
    out = jnp.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(to_velocity(out, jnp.zeros((2, 3)), jnp.ones(2), "velocity"), out)


def test_exact_clean_sample_gives_the_true_velocity():
    k0, k1 = jax.random.split(jax.random.key(0))
    x0, eps = jax.random.normal(k0, (4, 6, 6, 3)), jax.random.normal(k1, (4, 6, 6, 3))
    sigma = jnp.asarray([1.0, 0.7, 0.2, 0.05])
    s = sigma[:, None, None, None]
    x = (1 - s) * x0 + s * eps
    np.testing.assert_allclose(to_velocity(x0, x, sigma, "sample"), eps - x0, rtol=1e-5, atol=1e-5)


def test_euler_step_to_zero_lands_on_the_prediction_and_small_sigma_is_clamped():
    x, x0_hat = jnp.full((2, 4), 3.0), jnp.full((2, 4), 1.0)
    sigma = jnp.asarray([0.25, 0.01])
    v = to_velocity(x0_hat, x, sigma, "sample")
    # The last ODE step x + (0 - sigma) v is the predicted sample itself...
    np.testing.assert_allclose(sampling.ode_step(x[:1], v[:1], 0.25, 0.0).x_next, x0_hat[:1], rtol=1e-6)
    # ...and below MIN_SIGMA the division uses MIN_SIGMA, so the velocity stays bounded.
    np.testing.assert_allclose(v[1], (3.0 - 1.0) / MIN_SIGMA, rtol=1e-6)


def test_unknown_prediction_is_refused():
    with pytest.raises(ValueError, match="prediction must be one of"):
        to_velocity(jnp.zeros(2), jnp.zeros(2), jnp.ones(2), "epsilon")
