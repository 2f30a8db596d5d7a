"""TempFlow-GRPO (flowjax.rl.tempflow) and per-step advantages, against float64 NumPy re-derivations of the
reference (Shredded-Pork/TempFlow-GRPO e66824e: scripts/train_sd3_pr.py, sd3_pipeline_with_logprob_perstep.py,
sd3_sde_with_logprob*.py) on the tiny linear velocity model of tests/test_methods.py (no network, fast)."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import geneval, pickscore, shapes, toy
from flowjax import sampling
from flowjax.rl.method import Cond, Context, velocity
from flowjax.rl.tempflow import branched_rollout, lane_plan, noise_weights, to_rows
from flowjax.rl.trainer import validate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_methods  # noqa: E402
from test_methods import PARAMS, REF, linear_apply, toy_method  # noqa: E402

B, H, W, C, L, D = 4, 3, 3, 3, 2, 3
GUIDANCE = 2.0


def cond(batch=B, seed=0):
    """Conditioning drawn with NumPy (a jax.random draw per shape costs a compile); the negative prompt's
    embeddings stored once, as the trainer's."""
    rng = np.random.default_rng(seed)
    ctx = jnp.asarray(rng.normal(size=(batch, L, D)), jnp.float32)
    pooled = jnp.asarray(rng.normal(size=(batch, C)), jnp.float32)
    return Cond(ctx, pooled, jnp.zeros((L, D), jnp.float32), 0.5 * jnp.ones((C,), jnp.float32))


def normal(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def np_velocity(p, x, s, cd, guidance=GUIDANCE):
    """The linear model with CFG in float64: x w + pooled b + 0.3 s, uncond + g (cond - uncond); p and cd hold
    NumPy arrays."""
    w, b = p["w"], p["b"]
    one = lambda pooled: x * w + pooled[:, None, None, :C] * b + 0.3 * s.reshape(-1, 1, 1, 1)
    v_u, v_c = one(np.broadcast_to(cd.neg_pooled, cd.pooled.shape)), one(cd.pooled)
    return v_u + guidance * (v_c - v_u)


def to_np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def np_sde(x, v, s, s_next, sig_max, a=0.7):
    """flow_grpo sd3_sde_with_logprob.py (TempFlow-GRPO e66824e): the step mean and its std (sqrt(-dt) in)."""
    s, s_next = s.reshape(-1, 1, 1, 1), s_next.reshape(-1, 1, 1, 1)
    dt = s_next - s
    std_t = np.sqrt(s / (1 - np.where(s == 1, sig_max, s))) * a
    mean = x * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    return mean, std_t * np.sqrt(-dt)


def np_log_prob(x_next, mean, std):
    lp = -((x_next - mean) ** 2) / (2 * std**2) - np.log(std) - np.log(np.sqrt(2 * np.pi))
    return lp.mean(axis=(1, 2, 3))


# ------------------------------------------------------------------------------ noise-aware weights


def test_noise_weights_reproduce_the_reference_constant():
    """train_sd3_pr.py (e66824e) weights the PPO term by 2.25 * std_dev_t (std_dev_t with its sqrt(-dt)): for
    SD3.5-M at 10 steps, shift 3, a = 0.7 and the 9 trained steps, 1 / mean(std) = 2.2522."""
    s = np.asarray(sampling.sigmas(10, 3.0), np.float64)
    _, std = np_sde(np.zeros((9, 1, 1, 1)), np.zeros((9, 1, 1, 1)), s[:9], s[1:10], s[1])
    std = std.reshape(-1)
    constant = 1.0 / std.mean()
    assert abs(constant - 2.25) < 5e-3 and abs(constant - 2.2522) < 1e-4
    weights = jax.jit(noise_weights)
    w = np.asarray(weights(sampling.sigmas(10, 3.0), 0.7, jnp.arange(9)))
    np.testing.assert_allclose(w, constant * std, rtol=2e-6)
    np.testing.assert_allclose(w[[0, 1, 8]], [1.57656, 1.67332, 0.50756], atol=1e-5)
    assert abs(w.mean() - 1.0) < 1e-6
    # any schedule and subset of trained steps, normalised over that subset
    s6 = np.asarray(sampling.sigmas(6, 2.0), np.float64)
    steps = np.asarray([0, 2, 3])
    _, std6 = np_sde(np.zeros((3, 1, 1, 1)), np.zeros((3, 1, 1, 1)), s6[steps], s6[steps + 1], s6[1], a=0.9)
    np.testing.assert_allclose(np.asarray(weights(s6, 0.9, steps)), std6.reshape(-1) / std6.mean(), rtol=2e-6)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        noise_weights(s6, 0.7, [])


# ------------------------------------------------------------------------------ the branched rollout


def np_branched(noise, sig, eps, cd, n, k):
    """sd3_pipeline_with_logprob_perstep.py (e66824e) in float64: ODE trunk; at each step i < n the trunk's own
    velocity feeds K SDE steps (noise eps[i, k]) and each branch runs the ODE to sigma = 0."""
    t = len(sig) - 1
    x, cd, params = np.float64(noise), to_np(cd), to_np(PARAMS)
    trunk, nxt, lps, finals = [], np.zeros((n, k) + x.shape), np.zeros((n, k, x.shape[0])), np.zeros((n, k) + x.shape)
    for i in range(n):
        s_i = np.full(x.shape[0], sig[i])
        v = np_velocity(params, x, s_i, cd)
        mean, std = np_sde(x, v, s_i, np.full(x.shape[0], sig[i + 1]), sig[1])
        for b in range(k):
            y = mean + std * np.float64(eps[i, b])
            nxt[i, b], lps[i, b] = y, np_log_prob(y, mean, std)
            for j in range(i + 1, t):
                y = y + (sig[j + 1] - sig[j]) * np_velocity(params, y, np.full(x.shape[0], sig[j]), cd)
            finals[i, b] = y
        trunk.append(x)
        x = x + (sig[i + 1] - sig[i]) * v
    return np.stack(trunk), nxt, lps, finals


@pytest.mark.parametrize("num_steps,n,k,lanes_per_call", [
    (6, 3, 4, 0), pytest.param(6, 3, 3, 2, marks=pytest.mark.slow), pytest.param(5, 4, 2, 0, marks=pytest.mark.slow)])
def test_branched_rollout_matches_the_reference(num_steps, n, k, lanes_per_call):
    """Trunk, SDE branches, ODE tails and log-probs against the NumPy re-derivation; every velocity evaluation
    counted: the trunk is shared, so B (n + K sum_{i<n} (T - 1 - i)) rows are evaluated (plus the half-idle
    lane of an odd n with an odd K)."""
    sig = sampling.sigmas(num_steps, 3.0)
    cd = cond()
    calls = []

    def counted(x, s):
        jax.debug.callback(lambda a: calls.append(int(np.prod(a.shape[:-3]))), x)
        return velocity(linear_apply, PARAMS, x, s, cd, GUIDANCE)

    noise = normal((B, H, W, C))
    key = jax.random.key(2)
    run = jax.jit(lambda z, kk: branched_rollout(counted, z, sig, kk, branch_steps=n, branches=k, noise_level=0.7,
                                                 lanes_per_call=lanes_per_call))
    out = run(noise, key)
    jax.block_until_ready(out)
    eps = np.asarray(jax.random.normal(key, (n, k, B, H, W, C)))  # the documented draw
    trunk, nxt, lps, finals = np_branched(noise, np.asarray(sig, np.float64), eps, cd, n, k)
    np.testing.assert_allclose(out.latents, trunk, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.next_latents, nxt, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.log_probs, lps, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out.samples, finals, rtol=1e-5, atol=1e-5)

    minimum = n + k * sum(num_steps - 1 - i for i in range(n))
    idle = (num_steps - 1 - n // 2) if (n % 2 and k % 2) else 0
    assert out.evaluations == minimum + idle
    assert sum(calls) == B * out.evaluations


def test_lane_plan_runs_each_tail_once():
    for t, n, k in ((10, 9, 6), (8, 4, 4), (8, 3, 5), (4, 1, 2)):
        plan = lane_plan(t, n, k)
        c, lanes = plan["sig_idx"].shape
        assert c == 2 * t - 1 - n
        for s in range(n * k):  # segment s = i * K + b starts once, ends once, T - 1 - i iterations apart
            i = s // k
            [[c0, l0]], [[c1, l1]] = np.argwhere(plan["start"] == s), np.argwhere(plan["end"] == s)
            assert l0 == l1 and c1 - c0 + 1 == t - 1 - i
            np.testing.assert_array_equal(plan["sig_idx"][c0:c1 + 1, l0], np.arange(i + 1, t))


# ------------------------------------------------------------------------------ the method


@pytest.fixture(scope="module")
def rolled():
    """A toy tempflow method (6 steps, 3 branch steps, K 4, CFG 2) with beta 0.3 and clip 0.05, and its rollout
    of the linear model for B seeds with the trainer's row indices: (method, config, sigmas, conditioning, keep,
    samples)."""
    method, c = toy_method("tempflow", beta=0.3, clip_range=0.05)
    sig = method.schedule(c.sample.num_steps, c.sample.shift)
    cd = cond()
    v = lambda x, s: velocity(linear_apply, PARAMS, x, s, cd, method.cfg.guidance)
    noise = normal((B, H, W, C))
    keep, samples = jax.jit(lambda z: method.rollout(v, z, sig, jax.random.key(2), None, jnp.arange(B)))(noise)
    return method, c, sig, cd, keep, samples


def test_rows_are_seed_branch_step_units(rolled):
    method, c, sig, cd, keep, samples = rolled
    n, k = method.branch_steps, c.tempflow.branches
    r = np.arange(B * k * n)
    assert samples.shape == (method.rows(B), H, W, C) and method.rows(B) == len(r)
    np.testing.assert_array_equal(keep["source"], r // (k * n))
    np.testing.assert_array_equal(keep["step"], r % n)
    np.testing.assert_array_equal(keep["group"], (r // (k * n)) * n + r % n)
    # row (seed b, branch kk, step i) of an [n, K, B] array and of the trunk's [n, B] one
    grid = np.arange(n * k * B).reshape(n, k, B)
    rows = np.asarray(to_rows(jnp.asarray(grid)))
    trunk = np.asarray(to_rows(jnp.asarray(grid[:, 0]), k))
    for b, kk, i in ((3, 2, 1), (0, 0, 0), (1, 3, 2)):
        assert rows[(b * k + kk) * n + i] == grid[i, kk, b] and trunk[(b * k + kk) * n + i] == grid[i, 0, b]
    # the kept trunk state of a unit's rows is shared by its K branches
    lat = np.asarray(keep["latents"]).reshape(B, k, n, -1)
    np.testing.assert_array_equal(lat, np.broadcast_to(lat[:, :1], lat.shape))


def test_seed_group_advantages(rolled):
    """(r - mean) / (population std + 1e-4) over the K branches of one (seed, step) (PerPromptStatTracker per
    step column, global_std=False; config/dgx.py *_sd3_pr)."""
    method, c, sig, cd, keep, samples = rolled
    n, k = method.branch_steps, c.tempflow.branches
    rewards = np.random.default_rng(0).normal(size=B * k * n)
    adv = np.asarray(method.advantages(jnp.asarray(rewards, jnp.float32), None, 0, keep))
    grid = rewards.reshape(B, k, n)
    ref = (grid - grid.mean(1, keepdims=True)) / (grid.std(1, keepdims=True) + 1e-4)
    np.testing.assert_allclose(adv, ref.reshape(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("filtered", [True, False])
def test_plan_trains_whole_units(filtered):
    """A minibatch holds whole (seed, branch) units, each unit's steps in order; the filter drops the units
    whose advantage is 0 on every step (train_sd3_pr.py: mask = advantages.abs().sum(dim=1) != 0)."""
    method, c = toy_method("tempflow", filter_zero_advantage=filtered)
    n, units, nb = method.branch_steps, 16, 4
    adv = np.random.default_rng(1).normal(size=(units, n))
    adv[[0, 5, 6, 9]] = 0.0  # 12 units left: a multiple of the 4 minibatches, so none is re-admitted
    adv[7, :-1] = 0.0  # one nonzero step keeps a unit
    rows, weights = (np.asarray(a) for a in method.plan(jnp.asarray(adv.reshape(-1), jnp.float32),
                                                         jax.random.key(0), nb))
    assert sorted(rows.tolist()) == list(range(units * n))
    blocks = rows.reshape(-1, n)
    assert np.all(blocks % n == np.arange(n)) and np.all(blocks // n == (blocks // n)[:, :1])
    w = weights.reshape(-1, n)
    assert np.all(w == w[:, :1])
    kept = set((blocks[w[:, 0] > 0, 0] // n).tolist())
    assert kept == (set(range(units)) - {0, 5, 6, 9} if filtered else set(range(units)))
    assert len({int(x) for x in w[:, 0].reshape(nb, -1).sum(1)}) == 1  # the same count per minibatch


def minibatch(method, keep, rows, advantages, weights, cd):
    mb = {key: v[rows] for key, v in keep.items() if key != "source"}
    mb.update(cond=cd.rows(np.asarray(keep["source"])[rows]), advantages=advantages[rows], weights=weights)
    return mb


def test_first_minibatch_is_on_policy_and_the_loss_follows_the_reference(rolled):
    """At the first minibatch the policy is the rollout's: ratio 1 (to an ulp). Against other parameters, the
    policy loss (advantage clamped, times w_i) and the KL (divided by 2 (std_t sqrt(-dt))^2, unweighted)
    follow train_sd3_pr.py's "grpo logic" re-derived in NumPy."""
    method, c, sig, cd, keep, samples = rolled
    n = method.branch_steps
    rewards = normal((samples.shape[0],), seed=7) * 3.0
    adv = method.advantages(rewards, None, 0, keep)
    rows, weights = (np.asarray(a) for a in method.plan(adv, jax.random.key(3), c.train.minibatches))
    size = len(rows) // c.train.minibatches
    rows, weights = rows[:size], weights[:size]
    mb = minibatch(method, keep, rows, adv, jnp.asarray(weights), cd)
    grads_fn = jax.jit(lambda p, m: method.grads(Context(linear_apply, REF, sig), p, None, m, None, jax.random.key(0)))
    _, m0 = grads_fn(PARAMS, mb)
    # ratio_min / ratio_max are the extremes over the chunks: a chunk's log-probs recomputed at another batch
    # shape than the rollout's may differ by an ulp (seen: 1 - 2^-24)
    assert abs(float(m0["ratio_min"]) - 1.0) < 1e-6 and abs(float(m0["ratio_max"]) - 1.0) < 1e-6
    assert float(m0["clipfrac"]) == 0.0

    other = {"w": PARAMS["w"] * 1.05, "b": PARAMS["b"] - 0.1}
    _, m1 = grads_fn(other, mb)
    s = np.asarray(sig, np.float64)
    w_noise = np.asarray(noise_weights(sig, 0.7, jnp.arange(n)), np.float64)
    src = np.asarray(keep["source"])[rows]
    cd_rows = to_np(cd.rows(src))
    policy, kl = [], []
    for j in range(n):  # chunk j: the j-th row of every unit
        sel = np.arange(j, size, n)
        x = np.asarray(mb["latents"], np.float64)[sel]
        y = np.asarray(mb["next_latents"], np.float64)[sel]
        idx = np.asarray(mb["step"])[sel]
        assert np.all(idx == j)
        cd_j = cd_rows.rows(sel)
        si, sn = s[idx], s[idx + 1]
        mean, std = np_sde(x, np_velocity(to_np(other), x, si, cd_j), si, sn, s[1])
        ref_mean, _ = np_sde(x, np_velocity(to_np(REF), x, si, cd_j), si, sn, s[1])
        ratio = np.exp(np_log_prob(y, mean, std) - np.asarray(mb["log_probs"], np.float64)[sel])
        a = np.clip(np.asarray(adv, np.float64)[rows][sel], -5, 5) * w_noise[idx]
        e = 0.05
        pg = np.maximum(-a * ratio, -a * np.clip(ratio, 1 - e, 1 + e))
        kl_rows = ((mean - ref_mean) ** 2).mean(axis=(1, 2, 3)) / (2 * std.reshape(-1) ** 2)
        wj = weights[sel]
        policy.append((wj * pg).sum() / wj.sum())
        kl.append((wj * kl_rows).sum() / wj.sum())
    np.testing.assert_allclose(float(m1["policy_loss"]), np.mean(policy), rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(float(m1["kl_loss"]), np.mean(kl), rtol=2e-4)
    np.testing.assert_allclose(float(m1["loss"]), np.mean(policy) + 0.3 * np.mean(kl), rtol=2e-4, atol=1e-6)


def test_micro_batched_rollout_equals_the_whole_one(rolled):
    """With `rows` (the trainer's row indices) each seed draws its own branch noise: rollouts in two micro-batch
    calls of 2 seeds, concatenated, give the whole call's rows, groups and samples; the per-seed draw is
    `step_noise(key, (B, n, K, ...), rows)`."""
    method, c, sig, cd, keep, samples = rolled
    v_of = lambda cd_: (lambda x, s: velocity(linear_apply, PARAMS, x, s, cd_, method.cfg.guidance))
    noise, key = normal((B, H, W, C)), jax.random.key(2)
    run = jax.jit(lambda z, cd_, r: method.rollout(v_of(cd_), z, sig, key, None, r))
    whole = (keep, samples)  # the fixture's: one call of the B seeds with rows arange(B)
    parts = [run(noise[r], cd.rows(r), jnp.asarray(r, jnp.int32)) for r in (np.arange(2), np.arange(2, B))]
    n, k = method.branch_steps, c.tempflow.branches
    for name in whole[0]:
        got = np.concatenate([np.asarray(p[0][name]) for p in parts])
        if name == "source":  # each row's seed within its call
            np.testing.assert_array_equal(got, np.tile(np.arange(2).repeat(k * n), 2))
        else:
            np.testing.assert_allclose(got, np.asarray(whole[0][name]), rtol=1e-6, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(np.concatenate([np.asarray(p[1]) for p in parts]), np.asarray(whole[1]), rtol=1e-6,
                               atol=1e-6)
    # the per-seed noise: seed b's branches at step i start from the trunk state plus its own eps[b, i, k]
    eps = np.asarray(sampling.step_noise(key, (B, n, k, H, W, C), jnp.arange(B)))
    x, y = (np.asarray(whole[0][a]).reshape(B, k, n, H, W, C) for a in ("latents", "next_latents"))
    d = (y - x)[:, 1, 0] - (y - x)[:, 0, 0]  # two branches of step 0 differ by std (eps_1 - eps_0)
    e = eps[:, 0, 1] - eps[:, 0, 0]
    np.testing.assert_allclose(d / e, np.full_like(d, (d / e).mean()), rtol=1e-3)


def test_grads_do_not_depend_on_padding_or_row_order(rolled):
    """The trainer pads a minibatch with zero-weight rows to the mesh (and splits it into `train.micro_batch`
    parts): the gradient is the weighted mean over the real rows whatever the padding and the row order."""
    method, c, sig, cd, keep, samples = rolled
    adv = method.advantages(normal((samples.shape[0],), seed=7) * 3.0, None, 0, keep)
    rows, weights = (np.asarray(a) for a in method.plan(adv, jax.random.key(3), c.train.minibatches))
    size = len(rows) // c.train.minibatches
    rows, weights = rows[:size], weights[:size]
    other = {"w": PARAMS["w"] * 1.05, "b": PARAMS["b"] - 0.1}
    run = jax.jit(lambda m: method.grads(Context(linear_apply, REF, sig), other, None, m, None, jax.random.key(0)))
    g0, m0 = run(minibatch(method, keep, rows, adv, jnp.asarray(weights), cd))
    padded = np.resize(rows, size + 5)  # 5 rows of weight 0, as the trainer pads (not a multiple of n)
    w = np.concatenate([weights, np.zeros(5, np.float32)])
    g1, m1 = run(minibatch(method, keep, padded, adv, jnp.asarray(w), cd))
    perm = np.random.default_rng(0).permutation(size + 5)
    g2, m2 = run(minibatch(method, keep, padded[perm], adv, jnp.asarray(w[perm]), cd))
    for g in (g1, g2):
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=1e-7)
    for m in (m1, m2):
        for name in ("loss", "policy_loss", "kl_loss"):
            np.testing.assert_allclose(float(m[name]), float(m0[name]), rtol=2e-5, atol=1e-8, err_msg=name)


@pytest.mark.slow
def test_micro_batched_epoch_equals_the_whole_one(tmp_path):
    """(~220 s on 2 shared CPU cores.) configs/toy.py:tempflow, one epoch: rollouts in `sample.micro_batch`
    calls of 2 seeds and updates in `train.micro_batch` calls of 5 rows (48-row minibatches padded to 50: parts
    that cut units) log what the whole-batch epoch logs."""
    from flowjax import sharding
    from flowjax.train import build

    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    out = {}
    for name, (sample_micro, train_micro) in {"whole": (0, 0), "micro": (2, 5)}.items():
        c = toy.get_config("tempflow")
        c.tensorboard, c.sample.micro_batch, c.train.micro_batch = False, sample_micro, train_micro
        trainer = build(c, tmp_path / name, mesh=mesh)
        try:
            if name == "micro":
                assert trainer.micro_rows == 2 and (trainer.minibatch_rows, trainer.train_calls) == (50, 10)
            out[name] = trainer.train_step()
            out[name]["params"] = jax.tree.leaves(jax.device_get(trainer.state.params))
        finally:
            trainer.close()
    a, b = out["whole"], out["micro"]
    for key in ("reward/mean", "reward/std", "loss", "policy_loss", "grad_norm", "nfe/rollout", "nfe/train"):
        np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-7, err_msg=key)
    for x, y in zip(a["params"], b["params"]):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6)


def test_nfe_counts_and_validation():
    """Model evaluations per epoch: the shared trunk plus K tails per branch step (CFG pairs count 2), then one
    policy (+ reference) forward per trained row. SD3.5-M (config/dgx.py geneval_sd3_pr): 9 + 6 x 45 = 279 CFG
    evaluations per seed, 32 seeds, 1,728 trained rows."""
    method = validate(geneval.get_config("tempflow"))
    assert method.branch_steps == 9 and method.rows(32) == 32 * 6 * 9
    assert method.nfes(32) == {"rollout": 279 * 2 * 32, "train": 1728 * 2 * 2}
    toy_m, c = toy_method("tempflow")  # 6 steps, 3 branch steps, K 4, CFG 2, no KL
    assert toy_m.nfes(8) == {"rollout": (3 + 4 * (5 + 4 + 3)) * 2 * 8, "train": 8 * 4 * 3 * 2}
    for module in (toy, shapes, geneval, pickscore):  # every tempflow variant validates
        assert validate(module.get_config("tempflow")).name == "tempflow"
    for section, key, value, message in (("tempflow", "branches", 1, "branches must be >= 2"),
                                         ("tempflow", "timestep_fraction", 1.0, "between 1 and num_steps - 1"),
                                         ("tempflow", "noise_level", 0.0, "noise_level must be > 0"),
                                         ("train", "minibatches", 3, "whole units")):
        c = toy.get_config("tempflow")
        c[section][key] = value
        with pytest.raises(ValueError, match=message):
            validate(c)


# ------------------------------------------------------------------------------ per-step advantages (Flow-GRPO)


def test_flow_grpo_takes_per_step_advantages_batch_first():
    """FlowGRPO.grads takes advantages [B] or [B, T] (batch-first, column j = sampler step j): equal columns
    give exactly the [B] result, different columns the per-step PPO mean re-derived in NumPy."""
    method, c = toy_method("grpo", clip_range=0.05)
    spec, sig, window = method.rollout_spec(), method.schedule(c.sample.num_steps, c.sample.shift), None
    b, t = test_methods.B, c.sample.num_steps
    cd = cond(b)
    v = lambda x, s: velocity(linear_apply, PARAMS, x, s, cd, spec.guidance)
    out = jax.jit(lambda z, k: sampling.rollout(v, z, sig, k, kind=spec.kind, noise_level=spec.noise_level))(
        normal((b, test_methods.H, test_methods.W, test_methods.C)), jax.random.key(2))
    mb = {**method.keep(out, window), "cond": cd, "weights": jnp.ones((b,)),
          "advantages": jnp.asarray([1.0, -1.0, 0.5, 0.0, -0.5, 2.0])}
    ctx = Context(linear_apply, REF, sig)
    other = {"w": PARAMS["w"] * 1.05, "b": PARAMS["b"] - 0.1}
    run = jax.jit(lambda m: method.grads(ctx, other, None, m, window, jax.random.key(3)))
    g1, m1 = run(mb)
    per_step = {**mb, "advantages": jnp.broadcast_to(mb["advantages"][:, None], (b, t))}
    g2, m2 = run(per_step)
    for a, bb in zip(jax.tree.leaves((g1, m1)), jax.tree.leaves((g2, m2))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(bb))

    adv = np.random.default_rng(2).normal(size=(b, t)) * 2.0
    _, m3 = run({**mb, "advantages": jnp.asarray(adv, jnp.float32)})
    steps = np.asarray(method.train_steps(window, jax.random.key(3), b)[0])[:, 0]
    lat = np.asarray(mb["latents"])
    log_prob = jax.jit(lambda x, y, s, s_next: sampling.transition_log_prob(
        "sde", x, y, velocity(linear_apply, other, x, jnp.full((b,), s), mb["cond"], c.grpo.guidance), s, s_next,
        c.grpo.noise_level, sig_max=sig[1]).log_prob)
    pg = []
    for j in steps:
        lp = np.asarray(log_prob(lat[:, j], lat[:, j + 1], sig[j], sig[j + 1]), np.float64)
        ratio = np.exp(lp - np.asarray(mb["log_probs"], np.float64)[:, j])
        a = np.clip(adv[:, j], -5, 5)
        pg.append(np.mean(np.maximum(-a * ratio, -a * np.clip(ratio, 0.95, 1.05))))
    np.testing.assert_allclose(float(m3["policy_loss"]), np.mean(pg), rtol=1e-4, atol=1e-7)
    assert abs(float(m3["policy_loss"]) - float(m1["policy_loss"])) > 1e-4


# ------------------------------------------------------------------------------ a toy run


@pytest.mark.slow
def test_toy_run_reward_rises(tmp_path):
    """The whole loop on the toy world (configs/toy.py:tempflow): branched rollouts, every branch scored, seed
    groups, whole-unit minibatches; the training reward rises within 15 epochs (measured: 0.37 -> 0.50 over
    the first 10 with seed 0)."""
    from cli_runs import rows as read_metrics
    from flowjax import sharding
    from flowjax.train import build

    c = toy.get_config("tempflow")
    c.train.steps, c.tensorboard = 15, False
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    trainer = build(c, tmp_path, mesh=mesh)
    trainer.train()
    trainer.close()
    rows = read_metrics(tmp_path)
    train = [r["reward/mean"] for r in rows if "reward/mean" in r]
    assert np.mean(train[-5:]) > np.mean(train[:5]) + 0.1
    assert rows[1]["nfe/rollout"] == (3 + 4 * (5 + 4 + 3)) * 2 * 8 and rows[1]["nfe/train"] == 8 * 4 * 3 * 2
