"""flowjax.sampling against diffusers' schedule, closed forms and the reference formulas.

With Gaussian data (tests/gaussian_flow.py) the exact velocity is linear, so every kernel is an
affine map plus Gaussian noise, and the exact moments of the discrete chain follow from a float64
recursion: the Monte Carlo rollouts are compared with it within a few standard errors, and the
recursion with the continuous-time marginal within the discretisation error.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowjax import sampling
from gaussian_flow import MU, true_moments, velocity_gain, velocity_jax, velocity_np


def chain_moments(kind, sig, level):
    """Exact per-step mean / variance [T+1, 2, 2, 1] of the discrete chain from N(0, I)."""
    mean, var = np.zeros_like(MU), np.ones_like(MU)
    out = [(mean, var)]
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        dt = sn - s
        a_v, b_v = velocity_gain(s), -velocity_gain(s) * (1 - s) * MU - MU  # v = a_v x + b_v
        if kind == "ode":
            a, b, std = 1 + dt * a_v, dt * b_v, 0.0
        elif kind in ("sde", "dance"):
            if kind == "sde":
                g2 = level**2 * s / (1 - (sig[1] if s == 1 else s))
                std = math.sqrt(g2 * -dt)
            else:
                g2, std = level**2, level * math.sqrt(-dt)
            c = g2 / (2 * s) * dt
            a = 1 + dt * a_v + c * (1 + (1 - s) * a_v)
            b = dt * b_v + c * (1 - s) * b_v
        else:  # cps
            std = sn * math.sin(level * math.pi / 2)
            c = math.sqrt(sn**2 - std**2)
            a = (1 - sn) * (1 - s * a_v) + c * (1 + (1 - s) * a_v)
            b = (1 - sn) * (-s * b_v) + c * (1 - s) * b_v
        mean, var = a * mean + b, a**2 * var + std**2
        out.append((mean, var))
    return np.stack([m for m, _ in out]), np.stack([v for _, v in out])


# --------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [1, 4, 10, 28, 40])
def test_sigmas_match_diffusers(n, shift):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(n)
    ref = sched.sigmas.numpy()
    ours = np.asarray(sampling.sigmas(n, shift))
    assert ours.dtype == np.float32 and ours.shape == (n + 1,)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- marginals

N_MC = 100_000  # samples per dim: standard error of a variance is V * sqrt(2 / N) = 0.45 % of V


def _mc_rollout(kind, level, num_steps, shift, seed=0):
    sig = sampling.sigmas(num_steps, shift)
    noise = jax.random.normal(jax.random.key(seed), (N_MC, 2, 2, 1))
    run = jax.jit(lambda n, k: sampling.rollout(velocity_jax, n, sig, k, kind=kind, noise_level=level))
    out = run(noise, jax.random.key(seed + 1))
    return np.asarray(out.sigmas, np.float64), np.asarray(out.latents, np.float64)


# Discretisation error of |variance / true variance - 1| at 100 steps, shift 1, from the float64
# recursion: ode 2.9 %, sde 3.2 % (mid-way, the sigma=1 singularity of Flow-GRPO's std makes it
# converge like T^-1/2), dance 2.6 %. The tolerance covers them; the recursion test below shows the
# error shrinks with T, so it is discretisation and not a wrong kernel.
DISC_TOL = 0.04


@pytest.mark.parametrize("kind,level", [("ode", 0.0), ("sde", 0.7), ("dance", 0.3)])
def test_rollout_marginals(kind, level):
    sig, lat = _mc_rollout(kind, level, num_steps=100, shift=1.0)
    chain_m, chain_v = chain_moments(kind, sig, level)
    for j in (50, 100):  # an intermediate sigma (~0.5) and sigma = 0
        x = lat[j]
        m_mc, v_mc = x.mean(0), x.var(0)
        m_true, v_true = true_moments(sig[j])
        se_m = np.sqrt(v_true / N_MC)
        # Every kernel keeps the mean exact in discrete time (v at the mean is -mu), so only
        # sampling error remains: 5 standard errors.
        np.testing.assert_array_less(np.abs(m_mc - m_true), 5 * se_m + 1e-5)
        np.testing.assert_allclose(chain_m[j], m_true, atol=1e-12)
        # The rollout follows its chain's exact variance within 5 standard errors ...
        np.testing.assert_array_less(np.abs(v_mc / chain_v[j] - 1), 5 * math.sqrt(2 / N_MC))
        # ... and lands on the true marginal within sampling + discretisation error.
        np.testing.assert_array_less(np.abs(v_mc / v_true - 1), 5 * math.sqrt(2 / N_MC) + DISC_TOL)


@pytest.mark.parametrize("kind,level", [("ode", 0.0), ("sde", 0.7), ("dance", 0.3)])
def test_chain_variance_converges_to_marginal(kind, level):
    def worst(num_steps):
        sig = np.asarray(sampling.sigmas(num_steps, 1.0), np.float64)
        _, v = chain_moments(kind, sig, level)
        j = num_steps // 2
        return max(
            np.abs(v[j] / true_moments(sig[j])[1] - 1).max(), np.abs(v[-1] / true_moments(0.0)[1] - 1).max()
        )

    errs = [worst(t) for t in (100, 400, 1600)]
    assert errs[0] < DISC_TOL
    # First order for ode / dance (x4 steps -> /4); about T^-1/2 for sde (-> /2).
    assert errs[1] < errs[0] / 1.8 and errs[2] < errs[1] / 1.8, errs


def test_cps_step_and_marginal_mean():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 2, 2, 1)).astype(np.float32)
    v = rng.normal(size=(3, 2, 2, 1)).astype(np.float32)
    eps = rng.normal(size=(3, 2, 2, 1)).astype(np.float32)
    s, sn, a = 0.6, 0.45, 0.8
    st = sampling.cps_step(x, v, s, sn, eps, level=a)
    # The reference formula, float64.
    x, v, eps = (t.astype(np.float64) for t in (x, v, eps))
    std = sn * math.sin(a * math.pi / 2)
    mean = (1 - sn) * (x - s * v) + math.sqrt(sn**2 - std**2) * (x + (1 - s) * v)
    np.testing.assert_allclose(st.mean, mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(st.x_next, mean + std * eps, rtol=0, atol=1e-6)
    np.testing.assert_allclose(st.std, std, rtol=1e-6)

    # CPS's marginal mean is exact at every step (x0 and eps predictions average to mu and 0).
    # Its variance is not a check: with posterior-mean predictions CPS keeps only ~65 % of the
    # data variance at sigma=0 even as T grows (the float64 chain gives 0.65 at T=1600), a
    # property of the kernel, so the rollout is held to its own chain's variance instead.
    sig, lat = _mc_rollout("cps", 0.8, num_steps=20, shift=3.0)
    chain_m, chain_v = chain_moments("cps", sig, 0.8)
    for j in (10, 20):
        m_true, v_true = true_moments(sig[j])
        np.testing.assert_allclose(chain_m[j], m_true, atol=1e-12)
        np.testing.assert_array_less(np.abs(lat[j].mean(0) - m_true), 5 * np.sqrt(chain_v[j] / N_MC) + 1e-5)
        np.testing.assert_array_less(np.abs(lat[j].var(0) / chain_v[j] - 1), 5 * math.sqrt(2 / N_MC))


# --------------------------------------------------------------------------- log-probs


def _np_log_probs(kind, x, x_next, sig, level):
    """Reference log-probs [T, B] in float64, in the papers' own formulas."""
    out = []
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        dt = sn - s
        xi, xn = x[i], x_next[i]
        v = velocity_np(xi, s)
        if kind == "sde":
            std_t = level * math.sqrt(s / (1 - (sig[1] if s == 1 else s)))
            mean = xi * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
            std = std_t * math.sqrt(-dt)
        elif kind == "dance":
            x0 = xi - s * v
            score = -(xi - (1 - s) * x0) / s**2
            mean = xi + dt * v - 0.5 * level**2 * score * dt
            std = level * math.sqrt(-dt)
        else:  # cps
            std = sn * math.sin(level * math.pi / 2)
            mean = (1 - sn) * (xi - s * v) + math.sqrt(sn**2 - std**2) * (xi + (1 - s) * v)
            out.append(-((xn - mean) ** 2).reshape(len(xn), -1).mean(1))
            continue
        lp = -((xn - mean) ** 2) / (2 * std**2) - math.log(std) - math.log(math.sqrt(2 * math.pi))
        out.append(lp.reshape(len(xn), -1).mean(1))
    return np.stack(out)


@pytest.mark.parametrize("kind,level", [("sde", 0.7), ("dance", 0.3), ("cps", 0.8)])
def test_log_probs_follow_kernel(kind, level):
    sig = sampling.sigmas(10, 3.0)
    noise = jax.random.normal(jax.random.key(3), (8, 2, 2, 1))
    out = sampling.rollout(velocity_jax, noise, sig, jax.random.key(4), kind=kind, noise_level=level)
    lat, lps = np.asarray(out.latents), np.asarray(out.log_probs)
    assert out.latents.shape == (11, 8, 2, 2, 1) and lps.shape == (10, 8) and lps.dtype == np.float32
    np.testing.assert_array_equal(lat[0], np.asarray(noise))
    assert np.all(np.isfinite(lps))

    # Recomputing the log-prob of each stored transition gives the rollout's value.
    for i in range(10):
        v = velocity_jax(out.latents[i], jnp.full((8,), sig[i]))
        again = sampling.transition_log_prob(
            kind, out.latents[i], out.latents[i + 1], v, sig[i], sig[i + 1], level, sig_max=sig[1]
        )
        np.testing.assert_allclose(again.log_prob, lps[i], rtol=1e-6, atol=1e-5)

    # And it is the direct density of the papers' formulas (float64, from the exact velocity).
    ref = _np_log_probs(kind, lat[:-1].astype(np.float64), lat[1:].astype(np.float64), np.float64(sig), level)
    np.testing.assert_allclose(lps, ref, rtol=1e-4, atol=1e-4)


def test_sde_first_step_uses_sigma_max():
    sig = sampling.sigmas(10, 3.0)
    x = jnp.ones((2, 2, 2, 1))
    st = sampling.sde_step(x, x, sig[0], sig[1], None, level=0.7, sig_max=sig[1])
    assert float(sig[0]) == 1.0
    std_t, std = np.asarray(st.std_t).ravel()[0], np.asarray(st.std).ravel()[0]
    np.testing.assert_allclose(std_t, 0.7 * math.sqrt(1 / (1 - float(sig[1]))), rtol=1e-6)
    np.testing.assert_allclose(std, std_t * math.sqrt(float(sig[0] - sig[1])), rtol=1e-6)


def test_per_sample_sigmas_and_zero_level_gradient():
    sig = np.asarray(sampling.sigmas(10, 3.0))
    rng = np.random.default_rng(1)
    x, x_next, v = (jnp.asarray(rng.normal(size=(3, 2, 2, 1)), jnp.float32) for _ in range(3))
    idx = np.array([0, 4, 9])  # a shuffled-timestep training batch: one sigma per sample
    batched = sampling.transition_log_prob("sde", x, x_next, v, sig[idx], sig[idx + 1], 0.7, sig_max=sig[1])
    for b, i in enumerate(idx):
        one = sampling.transition_log_prob(
            "sde", x[b : b + 1], x_next[b : b + 1], v[b : b + 1], sig[i], sig[i + 1], 0.7, sig_max=sig[1]
        )
        np.testing.assert_allclose(batched.log_prob[b], one.log_prob[0], rtol=1e-6)

    # Level 0 is a deterministic step: log-prob 0 and a finite (zero) gradient, not NaN.
    def f(v):
        lp = sampling.transition_log_prob("sde", x, x_next, v, sig[2], sig[3], 0.0, sig_max=sig[1])
        return lp.log_prob.sum()

    assert float(f(v)) == 0.0
    g = jax.grad(f)(v)
    assert np.all(np.asarray(g) == 0)


# --------------------------------------------------------------------------- exact limits


def test_zero_noise_level_is_the_ode_rollout_bit_for_bit():
    sig = sampling.sigmas(12, 3.0)
    noise = jax.random.normal(jax.random.key(5), (4, 2, 2, 1))
    key = jax.random.key(6)
    ode = sampling.rollout(velocity_jax, noise, sig, key, kind="ode")
    assert np.all(np.asarray(ode.log_probs) == 0)
    run = jax.jit(
        lambda lvl, kind: sampling.rollout(velocity_jax, noise, sig, key, kind=kind, noise_level=lvl),
        static_argnums=1,
    )
    for kind in ("sde", "cps", "dance"):
        eager = sampling.rollout(velocity_jax, noise, sig, key, kind=kind, noise_level=0.0)
        traced = run(jnp.float32(0.0), kind)  # the level as a run-time value
        for out in (eager, traced):
            assert np.array_equal(np.asarray(out.latents), np.asarray(ode.latents)), kind
            assert np.all(np.asarray(out.log_probs) == 0), kind
        # Left out, the level is the kind's published one: stochastic, never silently the ODE.
        default = sampling.rollout(velocity_jax, noise, sig, key, kind=kind)
        assert not np.array_equal(np.asarray(default.latents), np.asarray(ode.latents)), kind


# --------------------------------------------------------------------------- windows


def test_window_is_ode_outside_and_stochastic_inside():
    num_steps, start, end = 10, 3, 6
    sig = sampling.sigmas(num_steps, 3.0)
    noise = jax.random.normal(jax.random.key(7), (4, 2, 2, 1))
    key = jax.random.key(8)
    ode = sampling.rollout(velocity_jax, noise, sig, kind="ode")
    out = sampling.rollout(
        velocity_jax, noise, sig, key, kind="sde", noise_level=0.7, sde_window=(start, end)
    )
    lat, lps = np.asarray(out.latents), np.asarray(out.log_probs)
    # Before the window the trajectory is the ODE one.
    assert np.array_equal(lat[: start + 1], np.asarray(ode.latents)[: start + 1])
    for i in range(num_steps):
        v = velocity_jax(out.latents[i], jnp.full((4,), sig[i]))
        ode_next = np.asarray(sampling.ode_step(out.latents[i], v, sig[i], sig[i + 1]).x_next)
        if start <= i < end:
            assert np.all(lps[i] != 0)
            assert np.abs(lat[i + 1] - ode_next).max() > 1e-2
        else:
            assert np.all(lps[i] == 0)
            np.testing.assert_allclose(lat[i + 1], ode_next, rtol=0, atol=1e-6)

    # A window start drawn inside jit gives the same rollout as the same window given statically.
    @jax.jit
    def traced(start):
        return sampling.rollout(
            velocity_jax, noise, sig, key, kind="sde", noise_level=0.7, sde_window=(start, start + 3)
        )

    again = traced(jnp.int32(start))
    np.testing.assert_allclose(np.asarray(again.latents), lat, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(again.log_probs), lps, rtol=0, atol=1e-5)


def test_sample_window_and_shared_noise():
    starts = [sampling.sample_window(jax.random.key(i), 10, 4) for i in range(50)]
    s = np.array([int(a) for a, _ in starts])
    assert s.min() >= 0 and s.max() <= 6 and len(set(s.tolist())) > 1
    assert all(int(b) - int(a) == 4 for a, b in starts)

    n = np.asarray(sampling.shared_noise(jax.random.key(0), 6, 3, (2, 2, 1)))
    assert n.shape == (6, 2, 2, 1)
    assert np.array_equal(n[0], n[1]) and np.array_equal(n[0], n[2]) and np.array_equal(n[3], n[5])
    assert not np.array_equal(n[0], n[3])


# --------------------------------------------------------------------------- errors


def test_errors():
    sig = sampling.sigmas(10)
    noise = jnp.zeros((2, 2, 2, 1))
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="unknown sampler kind 'euler'"):
        sampling.rollout(velocity_jax, noise, sig, key, kind="euler")
    with pytest.raises(ValueError, match="unknown sampler kind"):
        sampling.transition_log_prob("flow", noise, noise, noise, 0.5, 0.4, 0.7)
    for window in [(-1, 3), (2, 11), (5, 3)]:
        with pytest.raises(ValueError, match="0 <= start <= end <= num_steps=10"):
            sampling.rollout(velocity_jax, noise, sig, key, kind="sde", noise_level=0.7, sde_window=window)
    with pytest.raises(ValueError, match="pair"):
        sampling.rollout(velocity_jax, noise, sig, key, kind="sde", sde_window=3)
    for bad in ([0.0, 0.5, 1.0], [1.0, 0.5, 0.5, 0.0]):
        with pytest.raises(ValueError, match="strictly decreasing"):
            sampling.rollout(velocity_jax, noise, jnp.asarray(bad), key)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sampling.rollout(velocity_jax, noise, jnp.asarray([1.5, 0.5, 0.0]), key)
    with pytest.raises(ValueError, match="sig_max"):
        sampling.transition_log_prob("sde", noise, noise, noise, 1.0, 0.9, 0.7)
    with pytest.raises(ValueError, match="noise_level"):
        sampling.rollout(velocity_jax, noise, sig, key, kind="sde", noise_level=-0.1)
    with pytest.raises(ValueError, match="PRNG key"):
        sampling.rollout(velocity_jax, noise, sig, None, kind="sde", noise_level=0.7)
    with pytest.raises(ValueError, match="not divisible by group_size"):
        sampling.shared_noise(key, 10, 4, (2, 2, 1))
    with pytest.raises(ValueError, match="num_steps"):
        sampling.sigmas(0)
    with pytest.raises(ValueError, match="window_size"):
        sampling.sample_window(key, 10, 11)
