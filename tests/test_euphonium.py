"""Euphonium (flowjax.rl.euphonium, sampling.rollout(guide=...), flowjax.models.prm, flowjax.prm) against float64
NumPy re-derivations of zerzerzerz/Euphonium@d9f2c39: the guided DanceGRPO kernel (grpo_sampling/flux_step.py),
its scale rule (flux_step's `actual_scale`, utils.py's guided steps), the dual advantages and the dual PPO loss
(grpo_training/trainer.py `train_one_step`); the latent PRM's fit on a tiny world; a toy run (--runslow)."""

import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import toy
from flowjax import sampling
from flowjax.rl import euphonium as eu
from flowjax.rl.method import Cond, Context, build_method, velocity
from flowjax.rl.trainer import validate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gaussian_flow import MU, velocity_gain, velocity_jax, velocity_np  # noqa: E402

# The script's sampler: 16 steps, eta 0.25, guidance on steps 12..15 (scripts/train_grpo_hunyuan.sh).
STEPS, SHIFT, ETA = 16, 5.0, 0.25
TARGET = MU + 2.0  # the quadratic reward's maximum, away from the data mean


def quadratic_guide(x, sigma, v):
    """r(x) = -|x - TARGET|^2 (per sample) and its gradient -2 (x - TARGET)."""
    del sigma, v
    d = x - jnp.asarray(TARGET, jnp.float32)
    return -jnp.sum(d**2, axis=(1, 2, 3)), -2.0 * d


def scales(kl_beta=3.125, **kw):
    return eu.guidance_scales(sampling.dance_sigmas(STEPS, SHIFT), eta=ETA, scale=-1.0, kl_beta=kl_beta,
                              start=12, **kw)


def test_scale_rule_is_the_reference():
    """c_i = eta^2 / (2 beta) * (sigma_i - sigma_{i+1}) on steps 12..15 (the script's 0.01 * delta_t)."""
    sig = np.asarray(sampling.dance_sigmas(STEPS, SHIFT), np.float64)
    c = np.asarray(scales())
    ref = np.where(np.arange(STEPS) >= 12, 0.01 * (sig[:-1] - sig[1:]), 0.0)
    np.testing.assert_allclose(c, ref, rtol=1e-6, atol=0)
    assert np.count_nonzero(c) == 4
    # a non-negative scale is used as is; interval and end select steps as should_apply_process_reward
    sig32 = sampling.dance_sigmas(STEPS, SHIFT)
    c = np.asarray(eu.guidance_scales(sig32, eta=ETA, scale=0.5, kl_beta=1.0, start=2, end=9, interval=3,
                                      delta_t=False))
    np.testing.assert_array_equal(np.flatnonzero(c), [2, 5, 8])
    assert np.all(c[[2, 5, 8]] == 0.5)


@pytest.mark.parametrize("rows", [False, True])
def test_zero_scale_is_dance_bit_for_bit(rows):
    """All scales 0: the guided rollout is the dance rollout to the bit (whole-batch and per-row noise)."""
    sig = sampling.dance_sigmas(STEPS, SHIFT)
    noise = jax.random.normal(jax.random.key(0), (32, 2, 2, 1))
    key = jax.random.key(1)
    kw = dict(kind="dance", noise_level=ETA, rows=jnp.arange(32) + 5 if rows else None)
    plain = jax.jit(lambda n: sampling.rollout(velocity_jax, n, sig, key, **kw))(noise)
    zero = jax.jit(lambda n: sampling.rollout(velocity_jax, n, sig, key, guide=quadratic_guide,
                                              guide_scale=jnp.zeros(STEPS), **kw))(noise)
    np.testing.assert_array_equal(np.asarray(zero.latents), np.asarray(plain.latents))
    np.testing.assert_array_equal(np.asarray(zero.log_probs), np.asarray(plain.log_probs))
    np.testing.assert_array_equal(np.asarray(zero.guide_scores), 0.0)
    assert plain.guide_scores is None


def reference_guided_chain(x, eps, sig, c, eta):
    """flux_step (sde_solver=True, use_reward_guided_mean_for_logprob=False) in float64 NumPy with the quadratic
    reward's gradient: latents [T+1, B, ...], log-probs [T, B] and the scores of x_i on guided steps."""
    lat, lps, scores = [x], [], []
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        v = velocity_np(x, s)
        dsigma = s_next - s
        mean = x + dsigma * v
        x0 = x - s * v
        score = -(x - x0 * (1 - s)) / s**2
        mean = mean + (-0.5 * eta**2 * score) * dsigma
        std = eta * math.sqrt(s - s_next)
        unguided = mean
        scores.append(-np.sum((x - TARGET) ** 2, axis=(1, 2, 3)) if c[i] else np.zeros(len(x)))
        if c[i]:
            mean = mean + c[i] * (-2.0 * (x - TARGET))
        x = mean + std * eps[i]
        lp = -((x - unguided) ** 2) / (2 * std**2) - math.log(std) - math.log(math.sqrt(2 * math.pi))
        lps.append(lp.mean(axis=(1, 2, 3)))
        lat.append(x)
    return np.stack(lat), np.stack(lps), np.stack(scores)


def test_quadratic_guide_follows_the_reference_kernel():
    """Trajectory by trajectory: the same noise through flowjax's guided rollout (float32) and the reference
    maths (float64), with a strong tilt (beta 0.05) so that the guidance term is large."""
    sig = sampling.dance_sigmas(STEPS, SHIFT)
    c = scales(kl_beta=0.05)
    n, key = 64, jax.random.key(3)
    noise = jax.random.normal(jax.random.key(2), (n, 2, 2, 1))
    out = sampling.rollout(velocity_jax, noise, sig, key, kind="dance", noise_level=ETA, guide=quadratic_guide,
                           guide_scale=c)
    eps = np.stack([np.asarray(jax.random.normal(k, noise.shape), np.float64) for k in jax.random.split(key, STEPS)])
    lat, lps, scores = reference_guided_chain(np.asarray(noise, np.float64), eps, np.asarray(sig, np.float64),
                                              np.asarray(c, np.float64), ETA)
    print(f"guided kernel vs float64 reference: latents max abs error {np.abs(np.asarray(out.latents) - lat).max():.2e}, "
          f"log-probs {np.abs(np.asarray(out.log_probs) - lps).max():.2e}")
    np.testing.assert_allclose(np.asarray(out.latents), lat, rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(out.log_probs), lps, rtol=0, atol=2e-4)
    np.testing.assert_allclose(np.asarray(out.guide_scores), scores, rtol=1e-5, atol=1e-4)


def test_quadratic_guide_moves_the_mean_by_the_expected_amount():
    """With the Gaussian world's linear velocity every guided step is affine, so the mean of the final samples
    follows a float64 recursion; the Monte Carlo means of guided and unguided rollouts (same noise) match it
    and the guided samples end nearer the reward's maximum."""
    sig = sampling.dance_sigmas(STEPS, SHIFT)
    c = np.asarray(scales(kl_beta=0.05), np.float64)
    s64 = np.asarray(sig, np.float64)

    def mean_chain(guided):
        m = np.zeros_like(MU)
        for i in range(STEPS):
            s, sn = s64[i], s64[i + 1]
            dt = sn - s
            a_v, b_v = velocity_gain(s), -velocity_gain(s) * (1 - s) * MU - MU
            g = ETA**2 / (2 * s) * dt
            pull = -2.0 * c[i] * (m - TARGET) if guided else 0.0  # the gradient at the step's start x_i
            m = (1 + dt * a_v + g * (1 + (1 - s) * a_v)) * m + dt * b_v + g * (1 - s) * b_v + pull
        return m

    n, key = 8192, jax.random.key(5)
    noise = jax.random.normal(jax.random.key(4), (n, 2, 2, 1))
    run = jax.jit(lambda scale: sampling.rollout(velocity_jax, noise, sig, key, kind="dance", noise_level=ETA,
                                                 guide=quadratic_guide, guide_scale=scale).latents[-1])
    guided, plain = np.asarray(run(jnp.asarray(c, jnp.float32)), np.float64), np.asarray(run(jnp.zeros(STEPS)))
    expected = mean_chain(True) - mean_chain(False)
    shift = (guided - plain).mean(0)
    se = (guided - plain).std(0) / math.sqrt(n)
    print("expected shift", expected.ravel(), "measured", shift.ravel(), "se", se.ravel())
    assert np.all(np.abs(shift - expected) < 4 * se + 1e-6)
    assert np.all(np.abs(expected) > 20 * se)  # the shift is far above the noise of the estimate
    assert np.all(np.abs(guided.mean(0) - TARGET) < np.abs(plain.mean(0) - TARGET))
    np.testing.assert_allclose(plain.mean(0), mean_chain(False), atol=5 * plain.std(0).max() / math.sqrt(n))


def test_guide_errors():
    sig = sampling.dance_sigmas(4, 3.0)
    noise, key = jnp.zeros((2, 2, 2, 1)), jax.random.key(0)
    with pytest.raises(ValueError, match="needs both guide"):
        sampling.rollout(velocity_jax, noise, sig, key, kind="dance", guide=quadratic_guide)
    with pytest.raises(ValueError, match=r"guide_scale must be a scalar or \[num_steps=4\]"):
        sampling.rollout(velocity_jax, noise, sig, key, kind="dance", guide=quadratic_guide, guide_scale=jnp.zeros(3))
    with pytest.raises(ValueError, match="sde_window"):
        sampling.rollout(velocity_jax, noise, sig, key, kind="dance", guide=quadratic_guide, guide_scale=0.1,
                         sde_window=(0, 2))
    with pytest.raises(ValueError, match="multistep solver"):
        sampling.rollout(velocity_jax, noise, sig, key, kind="dpm2", guide=quadratic_guide, guide_scale=0.1)


# ------------------------------------------------------------------------------------ dual-reward GRPO


def reference_advantages(rewards, process, group_size):
    """trainer.py `train_one_step`: groups of consecutive `num_generations` rows, (r - mean) / (std + 1e-8) with
    torch's unbiased std, for the final rewards and for the process rewards step by step."""
    ora, pra = np.zeros_like(rewards), np.zeros_like(process)
    for g in range(len(rewards) // group_size):
        rows = slice(g * group_size, (g + 1) * group_size)
        ora[rows] = (rewards[rows] - rewards[rows].mean()) / (rewards[rows].std(ddof=1) + 1e-8)
        for t in range(process.shape[1]):
            p = process[rows, t]
            pra[rows, t] = (p - p.mean()) / (p.std(ddof=1) + 1e-8)
    return ora, pra


def test_dual_advantages_match_the_reference():
    rng = np.random.default_rng(0)
    groups, size, steps = 3, 8, 15
    rewards = rng.normal(size=groups * size)
    process = np.zeros((groups * size, steps))
    process[:, 12:] = rng.normal(size=(groups * size, 3))  # guided steps 12..14 (the last step is never trained)
    ora, pra = reference_advantages(rewards, process, size)
    perm = rng.permutation(groups * size)  # flowjax groups by id, wherever the rows sit
    ids = np.repeat(np.arange(groups), size)[perm]
    out = np.asarray(eu.dual_advantages(jnp.asarray(rewards[perm]), jnp.asarray(process[perm]), jnp.asarray(ids),
                                        num_groups=groups, std="per_prompt", eps=1e-8, ddof=1))
    assert out.shape == (groups * size, steps, 2)
    np.testing.assert_allclose(out[:, :, 0], np.broadcast_to(ora[perm, None], (groups * size, steps)), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(out[:, :, 1], pra[perm], rtol=1e-5, atol=1e-5)
    print(f"dual advantages max abs error: outcome {np.abs(out[:, 0, 0] - ora[perm]).max():.2e}, "
          f"process {np.abs(out[:, :, 1] - pra[perm]).max():.2e}")
    assert np.all(out[:, :12, 1] == 0.0)  # unguided steps: zero process advantage


def euphonium_config(**section):
    c = toy.get_config("euphonium")
    c.euphonium.update(section)
    validate(c)
    return c


def test_dual_loss_matches_the_reference():
    """Per trained step: coef_o * PPO(A_outcome) + coef_p * PPO(A_process), A clipped to 5, clip range 1e-4."""
    c = euphonium_config(clip_range=1e-4, process_coef=0.7, outcome_coef=1.3)
    method = build_method(c)
    rng = np.random.default_rng(1)
    b = 16
    old = rng.normal(size=b)
    new = old + rng.normal(scale=3e-4, size=b)  # ratios on both sides of the clip range
    adv = rng.normal(scale=4.0, size=(b, 2))
    lp = sampling.TransitionLogProb(jnp.asarray(new, jnp.float32), None, None, None)
    loss, metrics = method.transition_loss(lp, jnp.asarray(old, jnp.float32), jnp.asarray(adv, jnp.float32), None,
                                           None)

    def ppo(a):
        a = np.clip(a, -5.0, 5.0)
        r = np.exp(new - old)
        return np.mean(np.maximum(-a * r, -a * np.clip(r, 1 - 1e-4, 1 + 1e-4)))

    ref = 1.3 * ppo(adv[:, 0]) + 0.7 * ppo(adv[:, 1])
    print(f"dual loss {float(loss):.9g} reference (float64) {ref:.9g} relative error {abs(float(loss) / ref - 1):.2e}")
    np.testing.assert_allclose(float(loss), ref, rtol=2e-4)
    np.testing.assert_allclose(float(metrics["process_loss"]), ppo(adv[:, 1]), rtol=2e-4)
    np.testing.assert_allclose(float(metrics["outcome_loss"]), ppo(adv[:, 0]), rtol=2e-4)


B, H, W, C, L, D = 8, 4, 4, 4, 4, 8


def linear_apply(p, x, t, ctx, pooled):
    return x * p["w"] + pooled[:, None, None, :C] * p["b"] + (t / 1000.0)[:, None, None, None] * 0.3


def test_method_grads_and_dance_limit():
    """The method's rollout keeps the guide's scores on the guided steps, its metrics are its metric_names, and
    without process advantages (process_coef 0) its gradients are DanceGRPO's exactly."""
    params = {"w": jnp.asarray([0.9, 1.1, 1.0, 0.95]), "b": jnp.asarray([0.2, -0.1, 0.05, 0.0])}
    ref = {"w": jnp.ones(C), "b": jnp.zeros(C)}
    k = jax.random.split(jax.random.key(0), 3)
    cond = Cond(jax.random.normal(k[0], (B, L, D)), jax.random.normal(k[1], (B, D)), jnp.zeros((L, D)), jnp.zeros(D))
    c = euphonium_config(process_coef=0.0)
    method = build_method(c)
    sig = method.rollout_sigmas(c.sample.num_steps, c.sample.shift)
    spec = method.rollout_spec()
    v = lambda x, s: velocity(linear_apply, params, x, s, cond, spec.guidance, spec.integer_timesteps)
    window = method.window(0, jax.random.key(1))
    guide = lambda x, s, v: (-jnp.sum((x - 1.0) ** 2, axis=(1, 2, 3)), -2 * (x - 1.0))
    keep, samples = method.rollout(v, jax.random.normal(k[2], (B, H, W, C)), sig, jax.random.key(2), window,
                                   guide=guide)
    assert keep["process_scores"].shape == (B, c.sample.num_steps)
    guided = np.flatnonzero(np.asarray(method.guide_scales(sig)))
    np.testing.assert_array_equal(guided, [3, 4, 5])
    assert np.all(np.asarray(keep["process_scores"])[:, guided] < 0) and np.all(keep["process_scores"][:, :3] == 0)
    rewards = -jnp.sum((samples - 1.0) ** 2, axis=(1, 2, 3))
    adv = method.advantages(rewards, jnp.repeat(jnp.arange(2), 4), 2, keep)
    assert adv.shape == (B, c.sample.num_steps, 2)

    def grads_of(m, minibatch):
        return jax.jit(lambda p, mb: m.grads(Context(linear_apply, ref, sig), p, None, mb, window,
                                             jax.random.key(3)))(params, minibatch)

    mb = dict(keep, cond=cond, weights=jnp.ones(B), advantages=adv)
    grads, metrics = grads_of(method, mb)
    metrics.pop("skip")
    assert set(metrics) == set(method.metric_names)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    # DanceGRPO on the same rows with the outcome advantages only
    c.method, c.grpo = "grpo", c.euphonium
    g_dance, _ = grads_of(build_method(c), dict(mb, advantages=adv[:, 0, 0]))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(g_dance)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_config_errors():
    from flowjax.worlds.toy import ToyWorld

    with pytest.raises(ValueError, match="guide.path=DIR"):
        build_method(euphonium_config(guide={"source": "prm", "path": ""})).guide_state(
            ToyWorld(num_prompts=2, text_len=3, joint_dim=8, pooled_dim=8, channels=4))
    with pytest.raises(ValueError, match="guide.source must be one of"):
        euphonium_config(guide={"source": "spsa"})
    with pytest.raises(ValueError, match="0 <= start < end"):
        euphonium_config(guide={"start": 6})
    with pytest.raises(ValueError, match="process_coef=0"):
        euphonium_config(guide={"source": "none"})


# ------------------------------------------------------------------------------------ the latent PRM


def test_prm_fits_a_tiny_world_and_round_trips(tmp_path):
    """Regressed on noisy latents of a toy world (reward = closeness of the clean sample's channel means to the
    prompt's colour), the PRM's held-out scores correlate with the final reward, strongly at low noise; saved
    and loaded it scores the same; a folder of another shape is refused with every key named."""
    from flowjax import prm as prm_train
    from flowjax.models import prm as prm_lib
    from flowjax.worlds.toy import ToyWorld

    world = ToyWorld(num_prompts=4, text_len=3, joint_dim=8, pooled_dim=8, channels=3, seed=0, target_scale=0.7)
    rng = np.random.default_rng(0)
    n, sig = 384, np.asarray(sampling.sigmas(4, 3.0))
    prompts = np.repeat(np.arange(4), n // 4)
    x0 = rng.normal(size=(n, 6, 6, 3)) * 0.3 + rng.normal(size=(n, 1, 1, 3)) * 0.8
    eps = rng.normal(size=(len(sig), n, 6, 6, 3))
    lat = np.stack([(1 - s) * x0 + s * e for s, e in zip(sig, eps)], axis=1).astype(np.float32)
    rewards = np.asarray(world.reward(jnp.asarray(x0, jnp.float32), jnp.asarray(prompts)))
    data = {"latents": lat, "prompts": prompts, "groups": np.arange(n) // 8, "rewards": rewards, "sigmas": sig}
    tables = tuple(np.asarray(a, np.float32) for a in world.encode(np.arange(4)))
    encode = lambda ids: tuple(t[np.asarray(ids)] for t in tables)
    model, fit = prm_train.train_prm(data, encode, in_channels=3, text_dim=8, pooled_dim=8, steps=250,
                                     batch_size=64, lr=3e-3, width=8, log=lambda *_: None)
    h = fit["heldout"]
    print("held-out r per step", np.round(h["per_step"], 3), "within groups", np.round(h["within_group_per_step"], 3))
    assert h["per_step"][-1] > 0.7 and h["per_step"][-2] > 0.6  # clean sample and the last noisy step
    assert h["within_group_per_step"][-1] > 0.6  # it ranks the rollouts of one prompt, not only the prompts
    assert h["per_step"][-1] > h["per_step"][0] + 0.3  # more noise, less known about the outcome
    path = prm_lib.save(model, tmp_path / "prm", {"fit": fit})
    loaded, meta = prm_lib.load(path)
    args = (jnp.asarray(lat[:4, 3]), jnp.full(4, sig[3]), *encode(prompts[:4]))
    np.testing.assert_array_equal(np.asarray(loaded(*args)), np.asarray(model(*args)))
    assert json.loads((path / "config.json").read_text())["meta"]["fit"]["heldout"]["overall"] == h["overall"]
    other = prm_lib.initialise(prm_lib.LatentPRMConfig(in_channels=4, text_dim=8, pooled_dim=8, width=8))
    prm_lib.save(other, tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(Exception, match="wrong shapes"):
        prm_lib.load(tmp_path / "other")
    with pytest.raises(Exception, match="no config.json"):
        prm_lib.load(tmp_path)
    with pytest.raises(ValueError, match="in_channels: PRM 3, world 4"):
        eu.check_prm(loaded.config, ToyWorld(num_prompts=2, text_len=3, joint_dim=8, pooled_dim=8, channels=4))


# ------------------------------------------------------------------------------------ runs


def test_micro_batched_guided_rollout_matches_the_whole_batch(tmp_path):
    """sample.micro_batch > 0 with the guided rollout (configs/toy.py:euphonium, the toy reward's gradient
    guides): the trainer's rollout program called on 4 micro-batches of 4 rows, each with its rows' prompts,
    noise ids and row ids (as Trainer.train_step passes them), keeps what the whole-batch call keeps."""
    from flowjax import sharding
    from flowjax.train import build

    c = toy.get_config("euphonium")
    c.sample.micro_batch = 4
    trainer = build(c, tmp_path, mesh=sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                                                         devices=jax.devices()[:1]))
    assert trainer.micro_rows == 4 and [len(r) for r in trainer._micro_batches(16)] == [4] * 4
    prompt_ids, _ = trainer.sampler.batch(0)
    k_noise, k_sample = jax.random.split(jax.random.key(0))
    window = trainer.method.window(0, k_noise)

    def call(rows):
        ids = trainer._global(rows.astype(np.int32))
        keep, samples = trainer._rollout(trainer.state.params, trainer.frozen, trainer._cond(prompt_ids[rows]), ids,
                                         ids, k_noise, k_sample, window,
                                         trainer._global(prompt_ids[rows].astype(np.int32)), trainer.guide_state)
        return {k: np.asarray(v) for k, v in dict(keep, samples=samples).items()}

    whole = call(np.arange(16))
    parts = [call(rows) for rows in trainer._micro_batches(16)]
    trainer.close()
    assert np.count_nonzero(whole["process_scores"].any(axis=0)) == 3  # the 3 guided steps hold scores
    for key, value in whole.items():
        np.testing.assert_allclose(np.concatenate([p[key] for p in parts]), value, rtol=1e-5, atol=1e-6,
                                   err_msg=key)


@pytest.mark.slow
def test_toy_run_reward_rises(tmp_path):
    """configs/toy.py:euphonium end to end (the toy reward's own gradient guides): rewards rise."""
    from flowjax import sharding
    from flowjax.train import build

    c = toy.get_config("euphonium")
    c.train.steps = 20
    trainer = build(c, tmp_path, mesh=sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                                                         devices=jax.devices()[:1]))
    trainer.train()
    trainer.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r["reward/mean"] for r in rows if "reward/mean" in r]
    evals = [r["eval/reward_mean"] for r in rows if "eval/reward_mean" in r]
    print(f"train reward {np.mean(train[:5]):.3f} -> {np.mean(train[-5:]):.3f}, eval {evals[0]:.3f} -> {evals[-1]:.3f}")
    assert np.mean(train[-5:]) > np.mean(train[:5]) + 0.1 and evals[-1] > evals[0]
    assert rows[-1]["nfe/guide"] == 3 * c.train.prompts_per_batch * c.train.group_size
