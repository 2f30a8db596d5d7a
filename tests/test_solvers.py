"""The multistep solvers (dpm2, sa_solver) and the DanceGRPO / MixGRPO schedules of flowjax.sampling.

Each is checked against a float64 NumPy re-derivation written here from the reference code (not
from flowjax's): DiffusionNFT's `dpm_step` (NVlabs/DiffusionNFT@24af555,
flow_grpo/diffusers_patch/solver.py), AWM's `SASolver.sample` (scxue/advantage_weighted_matching@be51372,
advantage_weighted_matching/flow_grpo/diffusers_patch/sa_solver.py), DanceGRPO's schedule and step
subset (XueZeyue/DanceGRPO@15cc71d, fastvideo/train_grpo_flux.py) and MixGRPO's
`GRPOTrainingStates` (Tencent-Hunyuan/MixGRPO@e5cdd6a, fastvideo/utils/grpo_states.py); and on
Gaussian data (tests/gaussian_flow.py) against the exact ODE solution and marginal.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowjax import sampling
from gaussian_flow import MU, ode_solution, true_moments, velocity_jax, velocity_np

SHAPE = (2, 2, 1)

# --------------------------------------------------------------------------- references (float64)


def _half_log_snr(t):
    with np.errstate(divide="ignore"):
        return np.log(1.0 - t) - np.log(t)


def dpm2_reference(v_fn, z, sig):
    """`run_sampling(solver="dpm2", determistic=True)`: DPMState(order=2) + `dpm_step`, line by line."""
    sig = np.asarray(sig, np.float64)
    timesteps = sig[:-1]
    outputs, lower_order_nums = [None, None], 0
    traj = [z]
    for i in range(len(sig) - 1):
        x0 = z - sig[i] * v_fn(z, sig[i])  # convert_model_output
        outputs = [outputs[1], x0]  # DPMState.update
        lower_order_final = i == len(timesteps) - 1
        if lower_order_nums < 1 or lower_order_final:  # ddim_update(eta=0.0)
            t, s = sig[i + 1], sig[i]
            noise_pred = (z - (1 - s) * x0) / s
            z = (1 - t) * x0 + math.sqrt(t**2) * noise_pred
        else:  # multistep_dpm_solver_second_order_update
            st, s0, s1 = sig[i + 1], sig[i], sig[i - 1]
            lt, l0, l1 = _half_log_snr(st), _half_log_snr(s0), _half_log_snr(s1)
            m0, m1 = outputs[-1], outputs[-2]
            h, h_0 = lt - l0, l0 - l1
            r0 = h_0 / h
            d0, d1 = m0, (1.0 / r0) * (m0 - m1)
            a_t = 1 - st
            z = (st / s0) * z - (a_t * (np.exp(-h) - 1.0)) * d0 - 0.5 * (a_t * (np.exp(-h) - 1.0)) * d1
        lower_order_nums = min(lower_order_nums + 1, 2)  # DPMState.update_lower_order
        traj.append(z)
    return np.stack(traj)


def _exp_integral(order, a, b, tau):
    """`get_coefficients_exponential_positive`: int_a^b exp((1 + tau^2) x) x^order dx (orders 0, 1)."""
    c = 1 + tau**2
    b_, a_ = c * b, c * a
    if order == 0:
        return np.exp(b_) * (1 - np.exp(-(b_ - a_))) / c
    return np.exp(b_) * ((b_ - 1) - (a_ - 1) * np.exp(-(b_ - a_))) / c**2


def _lagrange(lams):
    """`lagrange_polynomial_coefficient` for 1 or 2 nodes."""
    if len(lams) == 1:
        return [[1.0]]
    l0, l1 = lams
    return [[1 / (l0 - l1), -l1 / (l0 - l1)], [1 / (l1 - l0), -l0 / (l1 - l0)]]


def _sa_update(order, x, tau, models, t_prev, noise, t, corrector):
    """`adams_bashforth_update_few_steps` / `adams_moulton_update_few_steps`, data prediction."""
    lam_t, lam_s = _half_log_snr(t), _half_log_snr(t_prev[-1])
    h = lam_t - lam_s
    nodes = t_prev + [t] if corrector else t_prev
    lams = [_half_log_snr(nodes[-(i + 1)]) for i in range(order)]
    lag = _lagrange(lams)
    g = [sum(lag[i][j] * _exp_integral(order - 1 - j, lam_s, lam_t, tau) for j in range(order)) for i in range(order)]
    if order == 2:  # the "few steps" modification
        c = 1 + tau**2
        if corrector:
            extra = np.exp(c * lam_t) * (h / 2 - (h * c - 1 + np.exp(c * (-h))) / (c**2 * h))
        else:
            extra = np.exp(c * lam_t) * (h**2 / 2 - (h * c - 1 + np.exp(c * (-h))) / c**2)
            extra = extra / (lam_s - _half_log_snr(t_prev[-2]))
        g[0] += extra
        g[1] -= extra
    grad = sum((1 + tau**2) * t * np.exp(-(tau**2) * lam_t) * g[i] * models[-(i + 1)] for i in range(order))
    noise_part = t * np.sqrt(1 - np.exp(-2 * tau**2 * h)) * noise
    return np.exp(-(tau**2) * h) * (t / t_prev[-1]) * x + grad + noise_part


def sa_solver_reference(v_fn, x, grid, tau_fn, noises):
    """`SASolver.sample(x, tau_fn, grid, predictor_order=2, corrector_order=2, pc_mode="PEC",
    return_intermediate=True)`, data prediction; noises[step] is step `step`'s torch.randn_like draw."""
    grid = [float(g) for g in grid]
    p_order, c_order, steps = 2, 2, len(grid) - 1
    data = lambda x, t: x - t * v_fn(x, t)  # noqa: E731
    t_prev, models, inter = [grid[0]], [data(x, grid[0])], [x]
    for step in range(1, max(p_order, c_order - 1)):
        t = grid[step]
        x_p = _sa_update(min(p_order, step), x, tau_fn(t), models, t_prev, noises[step], t, corrector=False)
        models.append(data(x_p, t))
        x = x_p  # disable_first_corrector
        inter.append(x)
        t_prev.append(t)
    for step in range(max(p_order, c_order - 1), steps + 1):
        p_used, c_used = min(p_order, steps - step + 1), min(c_order, steps - step + 2)  # lower_order_final
        t = grid[step]
        if step == steps:  # skip_final_step: denoise_to_zero
            x = models[-1]
        else:
            x_p = _sa_update(p_used, x, tau_fn(t), models, t_prev, noises[step], t, corrector=False)
            models.append(data(x_p, t))
            x = _sa_update(c_used, x, tau_fn(t), models, t_prev, noises[step], t, corrector=True)
        inter.append(x)
        t_prev.append(t)
        del models[0]
    return np.stack(inter)


def awm_tau(level, interval=(0.3, 0.9)):
    """sd3_pipeline_with_logprob.py: `lambda t: noise_level if 0.3 <= t <= 0.9 else 0`."""
    return lambda t: level if interval[0] <= t <= interval[1] else 0.0


def step_noises(key, num_steps, shape):
    """The step noise `rollout` documents: jax.random.normal(split(key, T)[i], x.shape)."""
    return [np.asarray(jax.random.normal(k, shape), np.float64) for k in jax.random.split(key, num_steps)]


class LinearField:
    """A random affine velocity v = (W0 + s W1) x + (b0 + s b1) on the flattened sample."""

    def __init__(self, seed, dim=4):
        rng = np.random.default_rng(seed)
        self.w0, self.w1 = (0.5 * rng.normal(size=(dim, dim)) for _ in range(2))
        self.b0, self.b1 = (rng.normal(size=dim) for _ in range(2))

    def np(self, x, s):
        flat = x.reshape(len(x), -1)
        return (flat @ (self.w0 + s * self.w1).T + (self.b0 + s * self.b1)).reshape(x.shape)

    def jax(self, x, s_b):
        s = s_b[:, None, None]
        flat = x.reshape(len(x), -1)
        w0, w1, b0, b1 = (jnp.asarray(a, jnp.float32) for a in (self.w0, self.w1, self.b0, self.b1))
        out = jnp.einsum("bij,bj->bi", w0 + s * w1, flat) + b0 + s[:, 0] * b1
        return out.reshape(x.shape)


def _noise(seed, batch):
    return jax.random.normal(jax.random.key(seed), (batch, *SHAPE))


# --------------------------------------------------------------------------- dpm2


def counted(fn, calls):
    """fn, appending to `calls` each time it is traced or called."""

    def wrapped(x, s):
        calls.append(1)
        return fn(x, s)

    return wrapped


def euler_np(v_fn, z, sig):
    """Euler rollout [T+1, ...] in float64 (the first-order baseline)."""
    traj = [z]
    for s, s_next in zip(sig[:-1], sig[1:]):
        z = z + (s_next - s) * v_fn(z, s)
        traj.append(z)
    return np.stack(traj)


# sigmas(4) starts at sigma = 1 (steps 0 and 1 first order, step 2 second order, step 3 last); the
# SA grid starts at 0.999, so its step 1 is a genuine second-order step.
@pytest.mark.parametrize("grid", [sampling.sigmas(4, 3.0), sampling.sa_solver_sigmas(10, 3.0)])
def test_dpm2_matches_reference(grid):
    field, calls = LinearField(0), []
    noise = _noise(1, 8)
    out = jax.jit(lambda n: sampling.rollout(counted(field.jax, calls), n, grid, kind="dpm2"))(noise)
    assert len(calls) == 1  # one scan body, traced once
    ref = dpm2_reference(field.np, np.asarray(noise, np.float64), np.asarray(grid, np.float64))
    assert out.latents.shape == ref.shape and out.log_probs.shape == (len(grid) - 1, 8)
    assert np.all(np.asarray(out.log_probs) == 0)
    np.testing.assert_array_equal(np.asarray(out.latents[0]), np.asarray(noise))
    scale = np.abs(ref).max()
    np.testing.assert_allclose(np.asarray(out.latents, np.float64), ref, rtol=0, atol=2e-6 * scale)


def test_dpm2_reference_is_euler_on_its_first_two_and_last_steps():
    # From sigma = 1 the reference's step 0 is DDIM with eta 0 (= Euler), its step 1 has lambda(1) = -inf
    # in D1's denominator (D1 = 0: first order) and its last step is DDIM again; so with 3 steps dpm2 is
    # Euler, and with 4 only step 2 differs.
    z = np.random.default_rng(0).normal(size=(4, *SHAPE))
    for n in (3, 4):
        sig = np.asarray(sampling.sigmas(n, 3.0), np.float64)
        dpm, euler = dpm2_reference(velocity_np, z, sig), euler_np(velocity_np, z, sig)
        np.testing.assert_allclose(dpm[:3], euler[:3], rtol=0, atol=1e-12)
        if n == 3:
            np.testing.assert_allclose(dpm, euler, rtol=0, atol=1e-12)
        else:
            assert np.abs(dpm[3] - euler[3]).max() > 1e-3


def _final_error(kind, num_steps, shift, noise):
    """Max |final sample - exact ODE solution| on the Gaussian data; "ode" in float64 NumPy."""
    if kind == "ode":
        grid = np.asarray(sampling.sigmas(num_steps, shift), np.float64)
        out = euler_np(velocity_np, np.asarray(noise, np.float64), grid)[-1]
    else:
        grid = sampling.sa_solver_sigmas(num_steps, shift) if kind == "sa_solver" else sampling.sigmas(num_steps, shift)
        out = sampling.rollout(velocity_jax, noise, grid, kind=kind, noise_level=0.0).latents[-1]
    exact = ode_solution(noise, float(grid[0]))  # sa_solver takes the noise as x at sigmas[0] = 0.999
    return float(np.abs(np.asarray(out, np.float64) - exact).max())


# Max |error| of the final sample over these 64 samples of the Gaussian data (steps 10 / 20 / 40 / 80):
#   shift 1: Euler 0.473 / 0.232 / 0.115 / 0.057, dpm2 0.456 / 0.093 / 0.020 / 0.0043
#   shift 3: Euler 0.590 / 0.292 / 0.145 / 0.073, dpm2 1.181 / 0.409 / 0.098 / 0.021
# With diffusers' SD3 schedule at shift 3 the last nonzero sigma is 0.0089 (0.15 -> 0.0089 at 20 steps,
# 0.28 -> 0.0089 at 10): one long step in log-SNR that the 2M extrapolation overshoots, so at <= 20 steps
# dpm2 is behind Euler there; replacing that sigma by half the previous one (as AWM's SA grid does) puts it
# ahead. The reference does the same (test_dpm2_matches_reference).
@pytest.mark.parametrize("shift,steps", [(1.0, (20, 40, 80)), (3.0, (40, 80))])
def test_dpm2_is_second_order_and_beats_euler(shift, steps):
    noise = _noise(2, 64)
    dpm = [_final_error("dpm2", n, shift, noise) for n in steps]
    euler = [_final_error("ode", n, shift, noise) for n in steps]
    # Euler is first order (x2 per doubling), dpm2 second order (about x4).
    assert all(1.8 < a / b < 2.2 for a, b in zip(euler, euler[1:])), euler
    assert all(a / b > 3.5 for a, b in zip(dpm, dpm[1:])), dpm
    assert all(d < e / 1.1 for d, e in zip(dpm, euler)), (dpm, euler)


# --------------------------------------------------------------------------- sa_solver


def test_sa_solver_sigmas_is_the_reference_grid():
    for n, shift in [(2, 3.0), (3, 1.0), (14, 3.0), (40, 3.0)]:
        t = np.asarray(sampling.sigmas(n, shift)).copy()  # scheduler.sigmas.float()
        t[-2] = t[-3] / 2
        t[0] = 1 - 1e-3
        got = np.asarray(sampling.sa_solver_sigmas(n, shift))
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, t)
    # n = 2: t[-3] is t[0] = 1, halved before t[0] is replaced.
    np.testing.assert_allclose(np.asarray(sampling.sa_solver_sigmas(2, 3.0)), [0.999, 0.5, 0.0], rtol=1e-7)
    # AWM trains on the standard grid: the two agree except at index 0 and num_steps - 1.
    std, sa = np.asarray(sampling.sigmas(14, 3.0)), np.asarray(sampling.sa_solver_sigmas(14, 3.0))
    assert np.flatnonzero(std != sa).tolist() == [0, 13]


# 2 steps: the shortest grid (one noisy first-order step, no corrector); 14 steps with AWM's window:
# noisy steps in [0.3, 0.9] and deterministic ones around them; 3 steps at tau 0 without a key.
@pytest.mark.parametrize(
    "num_steps,tau,interval,with_key", [(2, 1.0, (0.0, 1.0), True), (14, 0.4, None, True), (3, 0.0, None, False)]
)
def test_sa_solver_matches_reference(num_steps, tau, interval, with_key):
    field, calls = LinearField(4), []
    noise = _noise(5, 8)
    key = jax.random.key(6)
    grid = sampling.sa_solver_sigmas(num_steps, 3.0)
    out = jax.jit(
        lambda n, k: sampling.rollout(
            counted(field.jax, calls), n, grid, k, kind="sa_solver", noise_level=tau, sa_tau_interval=interval
        )
    )(noise, key if with_key else None)
    assert len(calls) == 1  # one scan body, traced once
    ref = sa_solver_reference(
        field.np,
        np.asarray(noise, np.float64),
        np.asarray(grid, np.float64),
        awm_tau(tau, interval or (0.3, 0.9)),
        step_noises(key, num_steps, noise.shape),
    )
    assert out.latents.shape == ref.shape == (num_steps + 1, 8, *SHAPE)
    assert np.all(np.asarray(out.log_probs) == 0) and out.log_probs.shape == (num_steps, 8)
    np.testing.assert_array_equal(np.asarray(out.latents[0]), np.asarray(noise))
    np.testing.assert_array_equal(np.asarray(out.sigmas), np.asarray(grid))
    scale = np.abs(ref).max()
    np.testing.assert_allclose(np.asarray(out.latents, np.float64), ref, rtol=0, atol=2e-6 * scale)


def test_sa_solver_tau0_is_second_order():
    noise = _noise(7, 64)
    errs = {n: _final_error("sa_solver", n, 3.0, noise) for n in (20, 40, 80)}
    euler = {n: _final_error("ode", n, 3.0, noise) for n in (20, 40, 80)}
    # Measured 0.180 / 0.042 / 0.012 (Euler 0.379 / 0.188 / 0.094): x4.3 then x3.5, about 2nd order (its
    # last step returns the data prediction at sigmas[-2] ~ 1/N, an O(1/N^2) error on Gaussian data).
    assert errs[20] / errs[40] > 3.0 and errs[40] / errs[80] > 3.3, errs
    assert all(errs[n] < euler[n] / 1.4 for n in errs), (errs, euler)


def _sa_chain_moments(num_steps, tau):
    """Exact mean / variance of the reference SA-Solver's final sample on the Gaussian data, from N(0, I)
    noise: the reference chain is affine in (noise, eps_1..eps_{N-1}) per dim, so one batched run on
    unit probes gives its coefficients (probe 0: all zero; 1: noise = 1; 1 + k: eps_k = 1)."""
    grid = np.asarray(sampling.sa_solver_sigmas(num_steps, 3.0), np.float64)
    probes = num_steps + 1
    z = np.zeros((probes, *SHAPE))
    z[1] = 1.0
    eps = [np.zeros((probes, *SHAPE)) for _ in range(num_steps)]
    for k in range(1, num_steps):
        eps[k][1 + k] = 1.0
    final = sa_solver_reference(velocity_np, z, grid, awm_tau(tau), eps)[-1]
    return final[0], ((final[1:] - final[0]) ** 2).sum(0)


def test_sa_solver_noise_and_marginal():
    n_mc, num_steps = 60_000, 20
    noise = jax.random.normal(jax.random.key(8), (n_mc, *SHAPE))
    # One program for all three runs: the grid is built while tracing, tau is a run-time value.
    run = jax.jit(
        lambda k, tau: sampling.rollout(
            velocity_jax, noise, sampling.sa_solver_sigmas(num_steps, 3.0), k, kind="sa_solver", noise_level=tau
        ).latents[-1]
    )
    # tau = 0 is deterministic: the keys make no difference, bit for bit.
    det = np.asarray(run(jax.random.key(0), 0.0))
    assert np.array_equal(det, np.asarray(run(jax.random.key(1), 0.0)))

    tau = 0.4
    x = np.asarray(run(jax.random.key(9), tau), np.float64)
    assert np.abs(x - det).max() > 0.1
    chain_m, chain_v = _sa_chain_moments(num_steps, tau)
    # The rollout follows the reference chain's exact moments within 5 standard errors ...
    np.testing.assert_array_less(np.abs(x.mean(0) - chain_m), 5 * np.sqrt(chain_v / n_mc))
    np.testing.assert_array_less(np.abs(x.var(0) / chain_v - 1), 5 * math.sqrt(2 / n_mc))
    # ... and that chain has the data's marginal in the limit: its mean is off only by the 0.999 start
    # (noise taken as x at sigma 0.999), its variance converges at 2nd order (18 % -> 2.3 % -> 0.2 %
    # at 20 / 80 / 320 steps on the S0 = 0.5 dim).
    v_true = true_moments(0.0)[1]
    rel = []
    for n in (20, 80, 320):
        m, v = _sa_chain_moments(n, tau)
        np.testing.assert_allclose(m, MU, rtol=0, atol=2e-3)
        rel.append(np.abs(v / v_true - 1).max())
    assert rel[0] > 4 * rel[1] > 16 * rel[2] and rel[2] < 5e-3, rel


def test_solver_errors():
    noise = jnp.zeros((2, *SHAPE))
    key = jax.random.key(0)
    sa = sampling.sa_solver_sigmas(10)
    with pytest.raises(ValueError, match="deterministic"):
        sampling.rollout(velocity_jax, noise, sampling.sigmas(10), kind="dpm2", noise_level=0.3)
    with pytest.raises(ValueError, match="sa_solver_sigmas"):
        sampling.rollout(velocity_jax, noise, sampling.sigmas(10), key, kind="sa_solver")
    with pytest.raises(ValueError, match="PRNG key"):
        sampling.rollout(velocity_jax, noise, sa, None, kind="sa_solver", noise_level=0.4)
    with pytest.raises(ValueError, match="sde_window"):
        sampling.rollout(velocity_jax, noise, sa, key, kind="sa_solver", sde_window=(0, 2))
    with pytest.raises(ValueError, match="sa_tau_interval"):
        sampling.rollout(velocity_jax, noise, sa, key, kind="sa_solver", sa_tau_interval=(0.9, 0.3))
    with pytest.raises(ValueError, match="sa_tau_interval applies"):
        sampling.rollout(velocity_jax, noise, sampling.sigmas(10), key, kind="sde", sa_tau_interval=(0.3, 0.9))
    with pytest.raises(ValueError, match="num_steps >= 2"):
        sampling.rollout(velocity_jax, noise, jnp.asarray([0.999, 0.0]), key, kind="sa_solver")
    with pytest.raises(ValueError, match="num_steps must be an integer >= 2"):
        sampling.sa_solver_sigmas(1)
    with pytest.raises(ValueError, match="multistep solver"):
        sampling.step("dpm2", noise, noise, 0.5, 0.4, None, level=0.0)
    assert set(sampling.SOLVERS).isdisjoint(sampling.KINDS)


# --------------------------------------------------------------------------- DanceGRPO


@pytest.mark.parametrize("num_steps,shift", [(16, 3.0), (16, 5.0), (25, 3.0), (7, 1.0)])
def test_dance_sigmas(num_steps, shift):
    got = np.asarray(sampling.dance_sigmas(num_steps, shift))
    lin = np.linspace(1.0, 0.0, num_steps + 1)  # float64 re-derivation of sd3_time_shift(linspace)
    np.testing.assert_allclose(got, shift * lin / (1 + (shift - 1) * lin), rtol=0, atol=2e-7)
    assert got.dtype == np.float32 and got[0] == 1.0 and got[-1] == 0.0


def test_dance_train_steps():
    # int(len(timesteps[:, :-1]) * timestep_fraction), Python float maths.
    for n in (2, 5, 10, 16, 25, 50):
        for f in (0.1, 0.3, 0.6, 0.9, 1.0):
            expected = int((n - 1) * f)
            if expected >= 1:
                assert sampling.dance_train_count(n, f) == expected
            else:
                with pytest.raises(ValueError, match="0 steps"):
                    sampling.dance_train_count(n, f)
    assert sampling.dance_train_count(16, 0.6) == 9

    batch, n = 3000, 16
    steps = np.asarray(sampling.dance_train_steps(jax.random.key(0), batch, n, 0.6))
    assert steps.shape == (batch, 9) and steps.dtype == np.int32
    assert steps.min() >= 0 and steps.max() <= n - 2  # the last step is never trained
    assert all(len(set(row)) == 9 for row in steps.tolist())  # without replacement
    # Per sample, not per batch: the rows' subsets differ (3000 draws of the C(15, 9) = 5005 subsets
    # give ~2260 distinct ones; one subset per batch would give 1).
    assert len({tuple(sorted(row)) for row in steps.tolist()}) > 2000
    # Each of the 15 steps is in a sample's subset with probability 9 / 15, and each position of the
    # random order is uniform over them: counts within 5 binomial standard deviations.
    p = 9 / 15
    counts = np.bincount(steps.ravel(), minlength=15)
    np.testing.assert_array_less(np.abs(counts - batch * p), 5 * math.sqrt(batch * p * (1 - p)))
    first = np.bincount(steps[:, 0], minlength=15)
    np.testing.assert_array_less(np.abs(first - batch / 15), 5 * math.sqrt(batch / 15 * (14 / 15)))


# --------------------------------------------------------------------------- MixGRPO


class GRPOTrainingStates:
    """The reference's progressive state machine (grpo_states.py), its progressive branch only."""

    def __init__(self, iters_per_group, group_size, max_timesteps, prog_overlap, prog_overlap_step, roll_back):
        self.iters_per_group, self.group_size, self.max_timesteps = iters_per_group, group_size, max_timesteps
        self.prog_overlap, self.prog_overlap_step, self.roll_back = prog_overlap, prog_overlap_step, roll_back
        self.cur_timestep = self.cur_iter_in_group = self.init_timestep = 0

    def update_iteration(self):
        self.cur_iter_in_group += 1
        if self.cur_iter_in_group >= self.iters_per_group:
            self.cur_iter_in_group = 0
            self.cur_timestep += self.prog_overlap_step if self.prog_overlap else self.group_size
        if self.cur_timestep > self.max_timesteps:
            if self.roll_back:
                self.cur_timestep, self.cur_iter_in_group = self.init_timestep, 0
            else:
                self.cur_timestep = self.max_timesteps

    def get_current_timesteps(self):
        return list(range(self.cur_timestep, min(self.cur_timestep + self.group_size, self.max_timesteps)))


@pytest.mark.parametrize(
    "num_steps,window,interval,overlap,stride,roll_back",
    [
        (25, 4, 25, True, 1, True),  # MixGRPO
        (25, 4, 20, True, 1, True),  # MixGRPO-Flash
        (25, 4, 20, True, 0, True),  # MixGRPO-Flash*
        (25, 4, 25, True, 1, False),
        (10, 3, 5, False, 3, True),  # without --prog_overlap the window moves by its size
        (12, 4, 3, True, 2, False),
    ],
)
def test_progressive_window_follows_reference(num_steps, window, interval, overlap, stride, roll_back):
    states = GRPOTrainingStates(interval, window, num_steps - 2, overlap, stride, roll_back)
    traced = jax.jit(
        lambda i: sampling.progressive_window(
            i, num_steps, window_size=window, shift_interval=interval, stride=stride, roll_back=roll_back
        )
    )
    iters = 1300
    got = np.asarray(jax.vmap(traced)(jnp.arange(iters, dtype=jnp.int32)))  # [2, iters]
    for it in range(iters):  # train_grpo_flux.py: get_current_timesteps(), then update_iteration()
        expected = states.get_current_timesteps()
        start, end = got[:, it]
        assert list(range(start, end)) == expected, (it, start, end, expected)
        if expected:
            assert start == states.cur_timestep
        states.update_iteration()
    # Never the last two steps.
    assert got[1].max() <= num_steps - 2
    if stride:
        assert got[0].max() > 0  # the window does move
    # Python ints give the same.
    assert tuple(int(v) for v in sampling.progressive_window(
        777, num_steps, window_size=window, shift_interval=interval, stride=stride, roll_back=roll_back
    )) == tuple(got[:, 777])


def test_progressive_window_published_run():
    # 300 iterations of the published MixGRPO run: start = iteration // 25 (0..11), window of 4.
    for it in range(300):
        assert tuple(int(v) for v in sampling.progressive_window(it, 25)) == (it // 25, it // 25 + 4)
    # The roll back: start 23 = num_steps - 2 gives an empty window, then back to 0.
    assert [tuple(int(v) for v in sampling.progressive_window(it, 25)) for it in (574, 575, 599, 600)] == [
        (22, 23), (23, 23), (23, 23), (0, 4)
    ]
    with pytest.raises(ValueError, match="num_steps"):
        sampling.progressive_window(0, 2)
    with pytest.raises(ValueError, match="iteration"):
        sampling.progressive_window(-1, 25)
