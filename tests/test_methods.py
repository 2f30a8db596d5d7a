"""The method layer: each plugin's gradients, metrics and recipe details against float64 NumPy
re-derivations of the reference code, on a tiny linear velocity model (no network, fast).

Each test names the reference file (and commit) whose behaviour it checks; together they cover the
deviations the review of the recipes found (issue "Methods as plugins").
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import toy
from flowjax import sampling
from flowjax.rl import ema as ema_lib
from flowjax.rl import grpo as grpo_lib
from flowjax.rl.awm import AWM, awm_timestep_indices
from flowjax.rl.method import Cond, Context, build_method, method_names, register
from flowjax.rl.trainer import accumulate_window, validate

B, H, W, C, L, D = 6, 4, 4, 3, 2, 3


def linear_apply(p, x, t, ctx, pooled):
    """A tiny velocity model: per-channel scale, text and time offsets (enough to differ per row)."""
    return x * p["w"] + pooled[:, None, None, :C] * p["b"] + (t / 1000.0)[:, None, None, None] * 0.3


def cond(key=0):
    k = jax.random.split(jax.random.key(key), 2)
    ctx = jax.random.normal(k[0], (B, L, D))
    pooled = jax.random.normal(k[1], (B, C))
    return Cond(ctx, pooled, jnp.zeros_like(ctx), jnp.zeros_like(pooled))


PARAMS = {"w": jnp.asarray([0.9, 1.1, 1.0]), "b": jnp.asarray([0.2, -0.1, 0.05])}
REF = {"w": jnp.asarray([1.0, 1.0, 1.0]), "b": jnp.asarray([0.0, 0.0, 0.0])}


def toy_method(variant, **section):
    c = toy.get_config(variant)
    c[c.method].update(section)
    validate(c)
    return build_method(c), c


def rollout_minibatch(method, config, key=1):
    """A real rollout of the linear model with the method's sampler, kept as the method keeps it."""
    spec = method.rollout_spec()
    sig = method.schedule(config.sample.num_steps, config.sample.shift)
    cd = cond()
    from flowjax.rl.method import velocity

    v = lambda x, s: velocity(linear_apply, PARAMS, x, s, cd, spec.guidance, spec.integer_timesteps)
    window = method.window(0, jax.random.key(5))
    grid = method.rollout_sigmas(config.sample.num_steps, config.sample.shift)
    out = sampling.rollout(v, jax.random.normal(jax.random.key(key), (B, H, W, C)), grid, jax.random.key(key + 1),
                           kind=spec.kind, noise_level=spec.noise_level, **spec.kwargs(),
                           **method.rollout_kwargs(window))
    mb = dict(method.keep(out, window))
    mb.update(cond=cd, advantages=jnp.asarray([1.0, -1.0, 0.5, 0.0, -0.5, 2.0]), weights=jnp.ones((B,)))
    return mb, sig, window


def test_registry_and_metric_names():
    assert set(method_names()) >= {"grpo", "awm", "nft"}
    for variant in ("grpo", "cps", "mixgrpo", "dance", "awm", "nft"):
        method, c = toy_method(variant)
        state = method.init_state(PARAMS)
        mb, sig, window = rollout_minibatch(method, c)
        grads, metrics = jax.jit(lambda p, s, m, w, k: method.grads(Context(linear_apply, REF, sig), p, s, m, w, k))(
            PARAMS, state, mb, window, jax.random.key(3))
        metrics.pop("skip", None)  # the trainer's signal for "nothing to train" (GRPO's empty windows)
        assert set(metrics) == set(method.metric_names), variant
        assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads)), variant
        assert np.isfinite(float(metrics["loss"]))


def test_unknown_method_and_registration():
    c = toy.get_config("grpo")
    c.method = "ppo"
    with pytest.raises(ValueError, match="method must be one of"):
        validate(c)
    c.method = "grpo"
    del c["grpo"]
    with pytest.raises(ValueError, match="needs its section config.grpo"):
        validate(c)

    class Echo(grpo_lib.FlowGRPO):
        name = "echo_grpo"

    register("echo_grpo", Echo)
    c = toy.get_config("grpo")
    c.method, c.echo_grpo = "echo_grpo", c.grpo
    assert isinstance(validate(c), Echo)


# ------------------------------------------------------------------------------ Flow-GRPO / CPS


def np_step_mean(kind, x, v, s, s_next, level, sig_max):
    """float64 NumPy re-derivation of the reference step means (flow_grpo sd3_sde_with_logprob.py ac4c86e;
    FlowCPS sd3_sde_with_logprob.py 814c359)."""
    x, v = np.float64(x), np.float64(v)
    s, s_next = s.reshape(-1, 1, 1, 1), s_next.reshape(-1, 1, 1, 1)
    if kind == "cps":
        std = s_next * np.sin(level * np.pi / 2)
        x0, x1 = x - s * v, x + v * (1 - s)
        return x0 * (1 - s_next) + x1 * np.sqrt(s_next**2 - std**2), std
    dt = s_next - s
    std = np.sqrt(s / (1 - np.where(s == 1, sig_max, s))) * level
    return x * (1 + std**2 / (2 * s) * dt) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt, std


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_kl_term_follows_each_reference(kind):
    """Flow-GRPO divides the KL by 2 std_t^2 (scripts/train_sd3.py ac4c86e); Flow-CPS removed the division
    (FlowCPS scripts/train_sd3.py, 814c359): at 10 steps the last trained cps step would otherwise weigh
    thousands of times more."""
    method, c = toy_method("cps" if kind == "cps" else "grpo", beta=0.5, guidance=1.0)
    mb, sig, window = rollout_minibatch(method, c)
    _, metrics = method.grads(Context(linear_apply, REF, sig), PARAMS, None, mb, window, jax.random.key(3))
    steps = np.asarray(method.train_steps(window, jax.random.key(3), B)[0])[:, 0]
    lat, sig64 = np.asarray(mb["latents"], np.float64), np.asarray(sig, np.float64)
    kls = []
    for j in steps:
        x = lat[:, j]
        s, s_next = np.full(B, sig64[j]), np.full(B, sig64[j + 1])
        t = jnp.asarray(s * 1000.0, jnp.float32)
        v_p = np.asarray(linear_apply(PARAMS, jnp.asarray(x, jnp.float32), t, mb["cond"].ctx, mb["cond"].pooled))
        v_r = np.asarray(linear_apply(REF, jnp.asarray(x, jnp.float32), t, mb["cond"].ctx, mb["cond"].pooled))
        m_p, std = np_step_mean(kind, x, v_p, s, s_next, c.grpo.noise_level, sig64[1])
        m_r, _ = np_step_mean(kind, x, v_r, s, s_next, c.grpo.noise_level, sig64[1])
        sq = ((m_p - m_r) ** 2).mean(axis=(1, 2, 3))
        kls.append(np.mean(sq if kind == "cps" else sq / (2 * std.reshape(-1) ** 2)))
    np.testing.assert_allclose(float(metrics["kl_loss"]), np.mean(kls), rtol=2e-4)


def np_reference_filter(adv, nb, rng):
    """flow_grpo scripts/train_sd3.py (ac4c86e) / train_sd3_fast.py (74db691): keep rows with a nonzero
    advantage, re-admit random dropped rows up to a multiple of nb (nb rows when none survive)."""
    mask = np.abs(adv.reshape(len(adv), -1)).sum(1) != 0
    n = mask.sum()
    if n % nb or n == 0:
        false = np.flatnonzero(~mask)
        need = nb - n % nb
        if len(false) >= need:
            mask[rng.permutation(false)[:need]] = True
    return mask


@pytest.mark.parametrize("zeros", [0, 5, 11, 24])
def test_zero_advantage_filter(zeros):
    """The mask keeps the reference's row counts, spreads kept rows evenly over the minibatches, and the
    weighted GRPO loss of each minibatch equals the plain loss over its kept rows (the reference's minibatch)."""
    b, nb = 24, 4
    rng = np.random.default_rng(zeros)
    adv = rng.normal(size=b)
    adv[rng.permutation(b)[:zeros]] = 0.0
    order, weights = (np.asarray(a) for a in jax.jit(grpo_lib.zero_advantage_plan, static_argnums=2)(
        jnp.asarray(adv, jnp.float32), jax.random.key(zeros), nb))
    assert sorted(order.tolist()) == list(range(b))
    ref_mask = np_reference_filter(adv, nb, rng)
    assert weights.sum() == ref_mask.sum()
    assert np.all(weights[adv[order] != 0] == 1.0)  # every nonzero-advantage row is trained
    per_mb = weights.reshape(nb, -1).sum(1)
    assert np.all(per_mb == per_mb[0])
    ratio = np.exp(rng.normal(scale=0.01, size=b))
    for i in range(nb):
        rows, w = order[i * b // nb:(i + 1) * b // nb], weights[i * b // nb:(i + 1) * b // nb]
        lp = jnp.asarray(np.log(ratio[rows]), jnp.float32)
        weighted, _ = grpo_lib.grpo_loss(lp, jnp.zeros_like(lp), adv[rows], clip_range=0.005, weights=w)
        kept = rows[w > 0]
        lk = jnp.asarray(np.log(ratio[kept]), jnp.float32)
        plain, _ = grpo_lib.grpo_loss(lk, jnp.zeros_like(lk), adv[kept], clip_range=0.005)
        np.testing.assert_allclose(float(weighted), float(plain), rtol=1e-5, atol=1e-7)


def test_filter_off_trains_every_row():
    method, _ = toy_method("grpo", filter_zero_advantage=False)
    order, weights = method.plan(jnp.zeros((8,)), jax.random.key(0), 2)
    assert sorted(np.asarray(order).tolist()) == list(range(8)) and np.all(np.asarray(weights) == 1.0)


def test_windows_never_reach_the_final_step():
    """MixGRPO (Tencent-Hunyuan/MixGRPO) never trains the last steps; a window there is refused."""
    c = toy.get_config("mixgrpo")
    c.grpo.window.range = (0, 6)  # 6 steps: a window of 2 could start at 4 and cover step 5, the last
    with pytest.raises(ValueError, match="final step"):
        validate(c)
    c.grpo.window.update(schedule="sliding")
    with pytest.raises(ValueError, match="window.schedule"):
        validate(c)
    c = toy.get_config("cps")
    c.grpo.timestep_fraction = 1.0
    with pytest.raises(ValueError, match="std is 0"):
        validate(c)


def test_progressive_window_masks_and_skips():
    """MixGRPO's progressive window (sampling.progressive_window, Tencent-Hunyuan/MixGRPO e5cdd6a) shrinks near
    the end: slots past it are out of the means, and an empty window trains nothing and makes no step."""
    method, c = toy_method("mixgrpo")
    c.grpo.window.update(schedule="progressive", size=3, shift_interval=2)
    method = validate(c)  # 6 steps: windows stop at step 4 (num_steps - 2)
    starts = [tuple(np.asarray(method.window(e, None)).tolist()) for e in range(12)]
    assert starts == [(0, 3), (0, 3), (1, 4), (1, 4), (2, 4), (2, 4), (3, 4), (3, 4), (4, 4), (4, 4), (0, 3), (0, 3)]
    idx, valid = method.train_steps(jnp.asarray([2, 4]), None, B)
    assert np.asarray(valid).tolist() == [True, True, False] and np.all(np.asarray(idx)[:2, 0] == [2, 3])
    mb, sig, _ = rollout_minibatch(method, c)
    ctx = Context(linear_apply, REF, sig)
    _, m_part = method.grads(ctx, PARAMS, None, mb, jnp.asarray([2, 4]), jax.random.key(0))
    _, m_full = method.grads(ctx, PARAMS, None, mb, jnp.asarray([2, 5]), jax.random.key(0))
    assert not bool(m_part["skip"]) and float(m_part["loss"]) != float(m_full["loss"])
    g_empty, m_empty = method.grads(ctx, PARAMS, None, mb, jnp.asarray([4, 4]), jax.random.key(0))
    assert bool(m_empty["skip"]) and all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(g_empty))


def test_dance_trains_a_random_subset_of_all_but_the_last_step():
    """DanceGRPO (fastvideo/train_grpo_flux.py, 15cc71d): per sample randperm(N - 1)[:int((N - 1) * 0.6)]."""
    method, c = toy_method("dance")
    idx, valid = method.train_steps(None, jax.random.key(1), 64)
    idx = np.asarray(idx)
    assert idx.shape == (int((c.sample.num_steps - 1) * 0.6), 64) and np.all(np.asarray(valid))
    assert idx.max() == c.sample.num_steps - 2 and all(len(set(col)) == len(col) for col in idx.T)
    assert len({tuple(col) for col in idx.T}) > 1
    spec = method.rollout_spec()
    assert spec.kind == "dance" and spec.integer_timesteps
    np.testing.assert_allclose(np.asarray(method.schedule(6, 3.0)), np.asarray(sampling.dance_sigmas(6, 3.0)))


def test_solvers_and_grids_of_awm_and_nft():
    """AWM samples with the SA-Solver on its own grid and trains on the standard one (train_sd3_awm.py
    be51372); DiffusionNFT samples with dpm2 on integer timesteps (pipeline_with_logprob.py 24af555)."""
    awm, c = toy_method("awm")
    spec = awm.rollout_spec()
    assert (spec.kind, spec.noise_level, spec.kwargs()) == ("sa_solver", 0.4, {"sa_tau_interval": (0.3, 0.9)})
    np.testing.assert_array_equal(np.asarray(awm.rollout_sigmas(14, 3.0)), np.asarray(sampling.sa_solver_sigmas(14)))
    np.testing.assert_array_equal(np.asarray(awm.schedule(14, 3.0)), np.asarray(sampling.sigmas(14)))
    nft, _ = toy_method("nft", solver="dpm2")  # the toy variant samples with Euler; the SD3.5 recipes keep dpm2
    spec = nft.rollout_spec()
    assert (spec.kind, spec.sampler, spec.integer_timesteps) == ("dpm2", "old", True)
    from configs import geneval
    assert geneval.get_config("nft").nft.solver == "dpm2"


def test_dance_advantages_use_the_unbiased_group_std():
    """DanceGRPO fastvideo/train_grpo_flux.py (15cc71d): (r - mean_g) / (std_g unbiased + 1e-8)."""
    method, c = toy_method("dance")
    rewards = np.random.default_rng(0).normal(size=16)
    groups = np.repeat(np.arange(4), 4)
    adv = np.asarray(method.advantages(jnp.asarray(rewards, jnp.float32), jnp.asarray(groups), 4, {}))
    ref = np.concatenate([(rewards[g * 4:(g + 1) * 4] - rewards[g * 4:(g + 1) * 4].mean())
                          / (rewards[g * 4:(g + 1) * 4].std(ddof=1) + 1e-8) for g in range(4)])
    np.testing.assert_allclose(adv, ref, rtol=1e-5)


# ------------------------------------------------------------------------------ AWM


def test_awm_draws_timesteps_per_device_microbatch():
    """train_sd3_awm.py (be51372) draws its stratified timesteps once per device micro-batch of
    train.batch_size rows (3 on GenEval): rows of one group share t, groups draw independently."""
    c = toy.get_config("awm")
    c.awm.update(rows_per_draw=2, num_train_timesteps=3, time_type="discrete_wo_init")
    method = validate(c)
    sig = sampling.sigmas(6)
    key = jax.random.key(7)
    t = np.asarray(method.train_timesteps(key, 8, sig))  # [K, B]: 4 groups of 2 rows
    assert np.all(t[:, 0::2] == t[:, 1::2])
    assert len({tuple(t[:, g]) for g in range(0, 8, 2)}) > 1  # the groups draw independently
    for g in range(4):  # a group's draw is keyed by the group (its rows' position // rows_per_draw)
        idx = awm_timestep_indices(jax.random.fold_in(key, g), 6, num_train_timesteps=3,
                                   timestep_fraction=c.awm.timestep_fraction)
        np.testing.assert_array_equal(t[:, 2 * g], np.asarray(sig)[np.asarray(idx)])
    c.awm.rows_per_draw = 3
    with pytest.raises(ValueError, match="rows_per_draw=3 must divide the minibatch of 8 rows"):
        validate(c)


def test_awm_discrete_time_type_can_draw_the_first_step():
    """PickScore's time_type="discrete" stratifies from index 0, so t = sigma_0 = 1 occurs (be51372)."""
    c = toy.get_config("awm")
    c.awm.update(time_type="discrete", num_train_timesteps=2, timestep_fraction=0.5, rows_per_draw=1)
    method = validate(c)
    sig = sampling.sigmas(6)
    t = np.asarray(method.train_timesteps(jax.random.key(0), 64, sig))
    assert np.any(t == 1.0) and np.all(t[0] >= float(sig[2]))
    c.awm.time_type = "discrete_wo_init"
    assert not np.any(np.asarray(validate(c).train_timesteps(jax.random.key(0), 64, sig)) == 1.0)


# ------------------------------------------------------------------------------ EMA copies, accumulation


def np_ema_wrapper(params_seq, steps, decay, every):
    """flow_grpo flow_grpo/ema.py EMAModuleWrapper (ac4c86e), float64."""
    ema = np.float64(params_seq[0])
    for p, s in zip(params_seq[1:], steps):
        d = min((1 + s) / (10 + s), decay)
        if (s + 1) % every == 0:
            ema = ema + (1 - d) * (np.float64(p) - ema)
    return ema


@pytest.mark.parametrize("decay,every", [(0.9, 8), (0.99, 1)])
def test_eval_ema_matches_the_reference_wrapper(decay, every):
    rng = np.random.default_rng(0)
    seq = [rng.normal(size=5).astype(np.float32) for _ in range(41)]
    steps = [i // 2 for i in range(40)]  # called per micro-batch, two micro-batches per optimizer step
    spec = ema_lib.EvalEMA(decay, every, "microbatch")
    ema = jnp.asarray(seq[0])
    for p, s in zip(seq[1:], steps):
        ema = ema_lib.eval_ema_step(ema, jnp.asarray(p), spec, s)
    np.testing.assert_allclose(np.asarray(ema), np_ema_wrapper(seq, steps, decay, every), rtol=1e-5)


def test_nan_minibatch_never_moves_an_accumulation_window():
    """Windows of `every` minibatches close on schedule whatever is skipped; the step averages the finite
    minibatches only, and a window with none makes no step."""
    acc = (jnp.zeros(2), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
    grads = [jnp.asarray([1.0, 2.0]), jnp.asarray([np.nan, 1.0]), jnp.asarray([np.nan, np.nan]),
             jnp.asarray([np.inf, 0.0]), jnp.asarray([3.0, 4.0])]
    finite = [True, False, False, False, True]
    steps = []
    for g, f in zip(grads, finite):
        acc, do, mean = accumulate_window(acc, g, jnp.asarray(f), 2)
        steps.append((bool(do), np.asarray(mean)))
    # windows (0, 1) and (2, 3) close on schedule; the second has no finite minibatch and makes no step
    assert [s[0] for s in steps] == [False, True, False, False, False]
    np.testing.assert_allclose(steps[1][1], [1.0, 2.0])  # the NaN minibatch is left out of the mean
    assert int(acc[2]) == 1 and int(acc[1]) == 1  # the fifth minibatch opened a new window of its own
    np.testing.assert_allclose(np.asarray(acc[0]), [3.0, 4.0])


def test_recipe_sections_round_trip_through_the_command_line_overrides():
    c = toy.get_config("awm")
    assert isinstance(c.awm, ml_collections.ConfigDict) and c.awm.kl_ema.schedule == "linear"
    assert AWM.defaults().eval_ema.to_dict() == {"decay": 0.99, "every": 1, "cadence": "epoch"}


def test_nfe_counts():
    """Model evaluations per epoch: rollout steps x CFG, plus each method's training forwards."""
    grpo, c = toy_method("grpo", beta=0.04)  # CFG 2, 6 steps, 5 trained (0.9), policy + reference
    assert grpo.nfes(16) == {"rollout": 6 * 2 * 16, "train": 5 * 16 * 2 * 2}
    mix, _ = toy_method("mixgrpo", beta=0.0)
    assert mix.nfes(16)["train"] == 2 * 16 * 2
    awm, c = toy_method("awm", beta=0.1, ema_beta=1.0)
    assert awm.nfes(16) == {"rollout": 6 * 2 * 16, "train": 3 * 16 * 3}
    nft, _ = toy_method("nft")  # CFG-free; policy + old policy (no KL in the toy)
    assert nft.nfes(16) == {"rollout": 6 * 16, "train": 5 * 16 * 2}
