"""flowjax.rl against NumPy re-derivations of the reference formulas.

Each `np_*` function below is written from the reference code's maths (Flow-GRPO's
PerPromptStatTracker and PPO loss, AWM's ghuber log-prob / PPO / KL terms, DiffusionNFT's
adaptive x0 loss), in float64 NumPy and independently of the JAX code.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flowjax import rl, sampling

TOL = dict(rtol=1e-5, atol=1e-5)


def rng(seed=0):
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------- NumPy references


def np_tracker_advantages(prompts, rewards, global_std, clip=5.0):
    """Flow-GRPO PerPromptStatTracker.update (type grpo) followed by the loss's clamp."""
    prompts = np.asarray(prompts)
    rewards = np.asarray(rewards, np.float64)
    adv = np.zeros_like(rewards)
    for p in np.unique(prompts):
        pr = rewards[prompts == p]
        mean = np.mean(pr)
        std = (np.std(rewards) if global_std else np.std(pr)) + 1e-4
        adv[prompts == p] = (pr - mean) / std
    return np.clip(adv, -clip, clip)


def np_grpo(lp, old, adv, clip_range, beta=0.0, mean=None, ref=None, std_t=None, adv_max=5.0):
    a = np.clip(adv, -adv_max, adv_max)
    ratio = np.exp(lp - old)
    pg = np.mean(np.maximum(-a * ratio, -a * np.clip(ratio, 1 - clip_range, 1 + clip_range)))
    if beta > 0:
        kl = ((mean - ref) ** 2).mean(axis=(1, 2, 3), keepdims=True) / (2 * std_t**2)
        return pg + beta * np.mean(kl)
    return pg


def np_awm(v, x0, eps, t, adv, p, clip_range, old_lp=None, v_ref=None, beta=0.0, v_ema=None, ema_beta=0.0):
    n = v.shape[0]
    lp = np.empty(n)
    for i in range(n):
        mse = np.mean((v[i] - (eps[i] - x0[i])) ** 2)
        lp[i] = -((mse + 1e-10) ** p - 1e-10**p) * t[i] / p
    old = lp if old_lp is None else old_lp
    a = np.clip(adv, -5, 5) / 5 * 1.0
    ratio = np.exp(lp - old)
    loss = np.mean(np.maximum(-a * ratio, -a * np.clip(ratio, 1 - clip_range, 1 + clip_range)))
    if v_ref is not None:
        loss += beta * np.mean([np.mean((v[i] - v_ref[i]) ** 2) for i in range(n)])
    if v_ema is not None:
        loss += ema_beta * np.mean([np.mean((v[i] - v_ema[i]) ** 2) for i in range(n)])
    return loss, lp


def np_nft(v, v_old, x_t, x0, t, adv, b, v_ref=None, kl_beta=0.0, adv_max=5.0):
    n = v.shape[0]
    per = np.empty(n)
    for i in range(n):
        r = np.clip(np.clip(adv[i], -adv_max, adv_max) / adv_max / 2 + 0.5, 0, 1)
        vp = b * v[i] + (1 - b) * v_old[i]
        vn = (1 + b) * v_old[i] - b * v[i]
        xp = x_t[i] - t[i] * vp
        xn = x_t[i] - t[i] * vn
        lp = np.mean((xp - x0[i]) ** 2 / max(np.mean(np.abs(xp - x0[i])), 1e-5))
        ln = np.mean((xn - x0[i]) ** 2 / max(np.mean(np.abs(xn - x0[i])), 1e-5))
        per[i] = r * lp / b + (1 - r) * ln / b
    loss = np.mean(per * adv_max)
    if v_ref is not None:
        loss += kl_beta * np.mean([np.mean((v[i] - v_ref[i]) ** 2) for i in range(n)])
    return loss


# --------------------------------------------------------------------------- advantages


def _grouped_batch(seed=0, groups=6, k=8):
    g = rng(seed)
    prompts = np.repeat(np.arange(groups), k)
    g.shuffle(prompts)  # members of a group scattered over the batch
    rewards = g.normal(size=prompts.shape).astype(np.float32) * g.uniform(0.5, 2, size=groups)[prompts]
    return prompts, rewards


@pytest.mark.parametrize("std", ["global", "per_prompt"])
def test_group_advantages_match_tracker(std):
    prompts, rewards = _grouped_batch()
    want = np_tracker_advantages(prompts, rewards, std == "global")
    got_dense = rl.group_advantages(rewards, prompts, num_groups=6, std=std)
    # Arbitrary integer ids (e.g. prompt hashes) without num_groups.
    hashed = (prompts.astype(np.int64) * 7919 - 40000).astype(np.int32)
    got_any = rl.group_advantages(rewards, hashed, std=std)
    assert got_dense.dtype == jnp.float32
    np.testing.assert_allclose(got_dense, want, **TOL)
    np.testing.assert_allclose(got_any, want, **TOL)


def test_advantages_clip_and_batch_branch():
    g = rng(1)
    rewards = np.concatenate([np.zeros(40), [50.0]]).astype(np.float32) + g.normal(size=41).astype(np.float32) * 0.01
    ids = np.zeros(41, np.int32)
    adv = rl.group_advantages(rewards, ids, num_groups=1)
    assert float(adv.max()) == 5.0  # the outlier's 6.4 is clipped
    np.testing.assert_allclose(adv, np_tracker_advantages(ids, rewards, True), **TOL)
    np.testing.assert_allclose(rl.group_advantages(rewards, ids, clip=None).max(), 6.3245, rtol=1e-3)
    want = np.clip((rewards - rewards.mean()) / (rewards.std() + 1e-4), -5, 5)
    np.testing.assert_allclose(rl.batch_advantages(rewards), want, **TOL)


def test_constant_group_gives_exact_zero():
    prompts, rewards = _grouped_batch(2)
    rewards[prompts == 3] = 0.1  # not representable: a naive mean would not return it exactly
    rewards[prompts == 4] = 7.3
    for std in ("global", "per_prompt"):
        adv = np.asarray(rl.group_advantages(rewards, prompts, std=std))
        assert np.all(adv[prompts == 3] == 0.0) and np.all(adv[prompts == 4] == 0.0)
        assert np.all(adv[prompts == 0] != 0.0)
    stats = rl.group_reward_stats(rewards, prompts, num_groups=6)
    assert float(stats["zero_std_ratio"]) == pytest.approx(2 / 6)
    want_std = np.mean([np.std(rewards[prompts == p].astype(np.float64)) for p in range(6)])
    np.testing.assert_allclose(stats["reward_std_mean"], want_std, **TOL)
    assert float(stats["group_size"]) == 8.0


def test_group_advantages_invariant_to_order():
    prompts, rewards = _grouped_batch(3)
    base = np.asarray(rl.group_advantages(rewards, prompts, std="per_prompt"))
    for seed in range(3):
        perm = rng(10 + seed).permutation(len(prompts))
        got = rl.group_advantages(rewards[perm], prompts[perm], std="per_prompt")
        np.testing.assert_allclose(got, base[perm], rtol=1e-6, atol=1e-6)


def test_group_advantages_jit_and_sharded_global_array():
    prompts, rewards = _grouped_batch(4)
    want = np.asarray(rl.group_advantages(rewards, prompts))
    f = jax.jit(lambda r, p: rl.group_advantages(r, p, num_groups=6))
    np.testing.assert_allclose(f(rewards, prompts), want, rtol=1e-6, atol=1e-6)
    # The trainer passes arrays sharded over devices; groups straddle the shards.
    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("data",))
    sh = NamedSharding(mesh, P("data"))
    r_g = jax.device_put(jnp.asarray(rewards), sh)
    p_g = jax.device_put(jnp.asarray(prompts), sh)
    np.testing.assert_allclose(f(r_g, p_g), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.jit(rl.group_advantages)(r_g, p_g), want, rtol=1e-6, atol=1e-6)


def test_advantages_errors():
    with pytest.raises(ValueError, match="num_groups"):
        rl.group_advantages(np.ones(4), np.array([0, 1, 2, 5]), num_groups=3)
    with pytest.raises(ValueError, match="integers"):
        rl.group_advantages(np.ones(4), np.ones(4))
    with pytest.raises(ValueError, match="std"):
        rl.group_advantages(np.ones(4), np.zeros(4, np.int32), std="local")


# --------------------------------------------------------------------------- Flow-GRPO


def _sde_batch(seed=0, b=4, shape=(4, 4, 2)):
    g = rng(seed)
    sig = sampling.sigmas(10)
    x = g.normal(size=(b, *shape)).astype(np.float32)
    v = g.normal(size=(b, *shape)).astype(np.float32)
    x_next = g.normal(size=(b, *shape)).astype(np.float32)
    s = np.asarray(sig)[[0, 2, 5, 8]][:b]
    s_next = np.asarray(sig)[[1, 3, 6, 9]][:b]
    return sig, x, v, x_next, s, s_next


def test_grpo_matches_reference():
    g = rng(5)
    b = 16
    lp = g.normal(size=b).astype(np.float32) * 0.3
    old = lp + g.normal(size=b).astype(np.float32) * 0.3
    adv = g.normal(size=b).astype(np.float32) * 4  # some beyond the [-5, 5] clamp
    mean = g.normal(size=(b, 3, 3, 2)).astype(np.float32)
    ref = mean + 0.1 * g.normal(size=mean.shape).astype(np.float32)
    std_t = g.uniform(0.3, 2.0, size=(b, 1, 1, 1)).astype(np.float32)
    for clip_range in (1e-4, 0.2):
        loss, m = rl.grpo_loss(lp, old, adv, clip_range=clip_range)
        np.testing.assert_allclose(loss, np_grpo(lp, old, adv, clip_range), **TOL)
        loss, m = rl.grpo_loss(lp, old, adv, clip_range=clip_range, beta=0.04, mean=mean, ref_mean=ref, std_t=std_t)
        want = np_grpo(lp, old, adv, clip_range, 0.04, mean, ref, std_t)
        np.testing.assert_allclose(loss, want, **TOL)
        ratio = np.exp(lp.astype(np.float64) - old)
        np.testing.assert_allclose(m["clipfrac"], np.mean(np.abs(ratio - 1) > clip_range), **TOL)
        np.testing.assert_allclose(m["approx_kl"], 0.5 * np.mean((lp - old.astype(np.float64)) ** 2), **TOL)
    # std_t given per sample [B] or as a scalar gives the same KL.
    l1, _ = rl.grpo_loss(lp, old, adv, beta=0.04, mean=mean, ref_mean=ref, std_t=std_t.reshape(b))
    np.testing.assert_allclose(l1, np_grpo(lp, old, adv, 1e-4, 0.04, mean, ref, std_t), **TOL)


def test_grpo_first_update_is_on_policy():
    sig, x, v, x_next, s, s_next = _sde_batch()
    adv = np.array([1.5, -0.5, 7.0, -2.0], np.float32)

    def lp_of(vel):
        return sampling.transition_log_prob("sde", x, x_next, vel, s, s_next, 0.7, sig_max=sig[1])

    step = lp_of(v)
    old = step.log_prob  # rollout log-prob == current-policy log-prob before any update
    ref = lp_of(v * 0.9)

    def loss_fn(vel):
        st = lp_of(vel)
        return rl.grpo_loss(st.log_prob, old, adv, beta=0.04, mean=st.mean, ref_mean=ref.mean, std_t=st.std_t)

    (loss, m), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(v))
    assert float(m["ratio_mean"]) == 1.0 and float(m["ratio_max"]) == 1.0 and float(m["ratio_min"]) == 1.0
    assert float(m["clipfrac"]) == 0.0 and float(m["approx_kl"]) == 0.0
    a = np.clip(adv, -5, 5)
    # ratio == 1: clipped and unclipped terms coincide, the policy loss is -mean(A).
    np.testing.assert_allclose(m["policy_loss"], -a.mean(), rtol=1e-6)
    assert np.all(np.isfinite(grad))
    # ... and the gradient is that of -mean(A * logp) + beta * KL.
    def surrogate(vel):
        st = lp_of(vel)
        kl = jnp.mean(jnp.mean((st.mean - ref.mean) ** 2, axis=(1, 2, 3)) / (2 * st.std_t.reshape(-1) ** 2))
        return -jnp.mean(a * st.log_prob) + 0.04 * kl

    np.testing.assert_allclose(grad, jax.grad(surrogate)(jnp.asarray(v)), rtol=1e-4, atol=1e-6)


def test_grpo_jit_bf16_and_errors():
    g = rng(6)
    lp = jnp.asarray(g.normal(size=8), jnp.bfloat16)
    old = lp + jnp.asarray(0.01, jnp.bfloat16)
    adv = jnp.asarray(g.normal(size=8), jnp.bfloat16)
    loss, m = jax.jit(lambda *a: rl.grpo_loss(*a, clip_range=0.1))(lp, old, adv)
    assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in m.values())
    want = np_grpo(np.asarray(lp, np.float64), np.asarray(old, np.float64), np.asarray(adv, np.float64), 0.1)
    np.testing.assert_allclose(loss, want, **TOL)
    with pytest.raises(ValueError, match="beta"):
        rl.grpo_loss(lp, old, adv, beta=0.04)


# --------------------------------------------------------------------------- AWM


def _awm_batch(seed=7, n=12, shape=(4, 4, 3)):
    g = rng(seed)
    x0 = g.normal(size=(n, *shape)).astype(np.float32)
    eps = g.normal(size=(n, *shape)).astype(np.float32)
    t = g.uniform(0.05, 1.0, size=n).astype(np.float32)
    v = (eps - x0 + 0.5 * g.normal(size=x0.shape)).astype(np.float32)
    v_ref = (v + 0.1 * g.normal(size=x0.shape)).astype(np.float32)
    v_ema = (v + 0.05 * g.normal(size=x0.shape)).astype(np.float32)
    adv = (g.normal(size=n) * 4).astype(np.float32)
    return x0, eps, t, v, v_ref, v_ema, adv


def test_awm_matches_reference():
    x0, eps, t, v, v_ref, v_ema, adv = _awm_batch()
    want, lp_np = np_awm(v, x0, eps, t, adv, 0.25, 1.0, v_ref=v_ref, beta=0.003, v_ema=v_ema, ema_beta=1.0)
    loss, m = rl.awm_loss(v, x0, eps, t, adv, v_ref=v_ref, beta=0.003, v_ema=v_ema, ema_beta=1.0)
    np.testing.assert_allclose(loss, want, **TOL)
    np.testing.assert_allclose(rl.awm_log_prob(v, x0, eps, t), lp_np, **TOL)
    assert float(m["ratio_mean"]) == 1.0  # on-policy by default
    # Off-policy: a stored old log-prob, ratio clipped to [0, 2] (clip_range 1) or [0.9, 1.1].
    old = lp_np + rng(8).normal(size=lp_np.shape) * 0.5
    for c in (1.0, 0.1):
        want, _ = np_awm(v, x0, eps, t, adv, 0.25, c, old_lp=old, v_ref=v_ref, beta=0.003)
        loss, _ = rl.awm_loss(v, x0, eps, t, adv, old_log_prob=old, clip_range=c, v_ref=v_ref, beta=0.003)
        np.testing.assert_allclose(loss, want, **TOL)
    np.testing.assert_allclose(
        rl.awm_advantages(adv), np.clip(adv.astype(np.float64) / 5, -1, 1), **TOL
    )
    tb = t[:, None, None, None]
    np.testing.assert_allclose(rl.awm_noised(x0, eps, t), (1 - tb) * x0 + tb * eps, **TOL)


def test_awm_on_policy_gradient_and_jit():
    x0, eps, t, v, v_ref, v_ema, adv = _awm_batch(9)
    a = np.clip(adv / 5, -1, 1)

    def f(vel):
        return rl.awm_loss(vel, x0, eps, t, adv, v_ref=v_ref, beta=0.003, v_ema=v_ema, ema_beta=1.0)[0]

    def surrogate(vel):
        lp = rl.awm_log_prob(vel, x0, eps, t)
        kl = jnp.mean((vel - v_ref) ** 2)
        ekl = jnp.mean((vel - v_ema) ** 2)
        return -jnp.mean(a * lp) + 0.003 * kl + ekl

    vb = jnp.asarray(v, jnp.bfloat16)  # bf16 model output accepted, computed in f32
    g = jax.jit(jax.grad(f))(vb.astype(jnp.float32))
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, jax.grad(surrogate)(vb.astype(jnp.float32)), rtol=1e-4, atol=1e-7)
    loss, m = jax.jit(lambda x: rl.awm_loss(x, x0, eps, t, adv))(vb)
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
    with pytest.raises(ValueError, match="beta"):
        rl.awm_loss(v, x0, eps, t, adv, beta=0.1)


def test_awm_timesteps():
    sig = sampling.sigmas(14)
    # Published: 14 steps, fraction 0.9, 6 draws; "discrete_wo_init" strata from linspace(1, 12, 7).
    lower = np.array([1, 2, 4, 6, 8, 10])
    upper = np.array([2, 4, 6, 8, 10, 12])
    seen = set()
    for seed in range(20):
        idx = np.asarray(rl.awm_timestep_indices(jax.random.key(seed), 14))
        assert np.all(idx >= lower) and np.all(idx < upper)
        seen.update(idx.tolist())
    assert seen == set(range(1, 12))  # every trainable step reachable, step 0 and 12+ never
    idx0 = np.asarray(rl.awm_timestep_indices(jax.random.key(0), 14, skip_first=False))
    assert np.all(idx0 >= np.arange(0, 12, 2)) and np.all(idx0 < np.arange(2, 13, 2))
    # Empty stratum (more draws than steps): the index is the stratum's lower bound.
    many = np.asarray(rl.awm_timestep_indices(jax.random.key(1), 10, num_train_timesteps=12, timestep_fraction=1.0))
    assert np.all(many == np.array([(1 * 12 + i * 9) // 12 for i in range(12)]))
    t = rl.awm_timesteps(jax.random.key(3), 5, sig)
    idx = np.asarray(rl.awm_timestep_indices(jax.random.key(3), 14))
    np.testing.assert_array_equal(np.asarray(t), np.repeat(np.asarray(sig)[idx], 5))  # timestep-major
    assert jax.jit(lambda k: rl.awm_timesteps(k, 5, sig))(jax.random.key(3)).shape == (30,)
    assert [float(rl.awm_ema_decay(s)) for s in (0, 100, 300, 5000)] == pytest.approx([0.0, 0.1, 0.3, 0.3])
    assert float(rl.awm_ema_decay(10, schedule="constant")) == pytest.approx(0.3)


# --------------------------------------------------------------------------- DiffusionNFT


def _nft_batch(seed=11, b=6, shape=(4, 4, 3)):
    g = rng(seed)
    x0 = g.normal(size=(b, *shape)).astype(np.float32)
    eps = g.normal(size=(b, *shape)).astype(np.float32)
    t = g.uniform(0.05, 1.0, size=b).astype(np.float32)
    x_t = ((1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps).astype(np.float32)
    v_old = (eps - x0 + 0.3 * g.normal(size=x0.shape)).astype(np.float32)
    v = (v_old + 0.1 * g.normal(size=x0.shape)).astype(np.float32)
    v_ref = (v + 0.1 * g.normal(size=x0.shape)).astype(np.float32)
    adv = (g.normal(size=b) * 4).astype(np.float32)
    return v, v_old, x_t, x0, t, adv, v_ref


def test_nft_matches_reference():
    v, v_old, x_t, x0, t, adv, v_ref = _nft_batch()
    for b in (1.0, 0.1):
        loss, m = rl.nft_loss(v, v_old, x_t, x0, t, adv, mix=b, v_ref=v_ref, kl_beta=1e-4)
        np.testing.assert_allclose(loss, np_nft(v, v_old, x_t, x0, t, adv, b, v_ref, 1e-4), **TOL)
        loss, _ = rl.nft_loss(v, v_old, x_t, x0, t, adv, mix=b)
        np.testing.assert_allclose(loss, np_nft(v, v_old, x_t, x0, t, adv, b), **TOL)
    r = np.clip(np.clip(adv, -5, 5) / 10 + 0.5, 0, 1)
    np.testing.assert_allclose(m["r_mean"], r.mean(), **TOL)
    # The weight's 1e-5 floor: a perfect x0 prediction gives a finite 0 loss term.
    exact = rl.adaptive_x0_mse(x0, x0)
    assert np.all(np.asarray(exact) == 0.0)


def test_nft_grads_finite_jit_bf16():
    v, v_old, x_t, x0, t, adv, v_ref = _nft_batch(12)

    def f(vel):
        return rl.nft_loss(vel, v_old, x_t, x0, t, adv, mix=0.1, v_ref=v_ref, kl_beta=1e-4)[0]

    g = jax.jit(jax.grad(f))(jnp.asarray(v))
    assert np.all(np.isfinite(g)) and np.any(g != 0)
    # The gradient only flows through v (v_old, v_ref and the weights are constants).
    g_old = jax.grad(lambda vo: rl.nft_loss(v, vo, x_t, x0, t, adv, v_ref=v_ref, kl_beta=1e-4)[0])(jnp.asarray(v_old))
    assert np.all(np.asarray(g_old) == 0.0)
    args = [jnp.asarray(a, jnp.bfloat16) for a in (v, v_old, x_t, x0, t, adv)]
    loss, m = jax.jit(lambda *a: rl.nft_loss(*a))(*args)
    assert loss.dtype == jnp.float32
    want = np_nft(*[np.asarray(a, np.float64) for a in args], 1.0)
    np.testing.assert_allclose(loss, want, rtol=1e-4)
    with pytest.raises(ValueError, match="mix"):
        rl.nft_loss(v, v_old, x_t, x0, t, adv, mix=0.0)


def test_nft_schedules_and_ema():
    assert [float(rl.old_policy_decay(s)) for s in (0, 100, 499, 5000)] == pytest.approx([0.0, 0.1, 0.499, 0.5])
    assert [float(rl.old_policy_decay(s, 2)) for s in (0, 74, 75, 175, 10_000)] == pytest.approx(
        [0.0, 0.0, 0.0, 0.75, 0.999]
    )
    assert float(rl.old_policy_decay(123, 0)) == 0.0
    assert float(jax.jit(rl.old_policy_decay)(jnp.int32(300))) == pytest.approx(0.3)
    assert [float(rl.eval_ema_decay(s, 0.9)) for s in (0, 10, 1000)] == pytest.approx([0.1, 11 / 20, 0.9])
    old = {"a": jnp.ones((2, 3)), "b": {"c": jnp.full((4,), 2.0, jnp.bfloat16)}, "n": jnp.int32(3)}
    new = {"a": jnp.zeros((2, 3)), "b": {"c": jnp.zeros((4,), jnp.bfloat16)}, "n": jnp.int32(7)}
    out = jax.jit(rl.ema_update)(old, new, 0.25)
    np.testing.assert_allclose(out["a"], 0.25)
    assert out["b"]["c"].dtype == jnp.bfloat16 and float(out["b"]["c"][0]) == 0.5
    assert int(out["n"]) == 7
    sig = sampling.sigmas(10)
    t = np.asarray(rl.nft_timesteps(jax.random.key(0), 7, sig))
    assert t.shape == (9, 7)
    for col in t.T:  # 9 distinct sampler timesteps per sample, never the final sigma 0
        assert len(set(col.tolist())) == 9 and set(col.tolist()) <= set(np.asarray(sig)[:-1].tolist())
