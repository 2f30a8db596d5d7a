"""GDRO (arXiv 2601.02036; no public code): the ranking loss against a float64 NumPy re-derivation of the
paper's Plackett-Luce loss with soft targets, its reduction to Diffusion-DPO (Wallace et al. 2023, eq. 14, in
flow-matching form), the implicit rewards and gradients of the method on the tiny linear model of
tests/test_methods.py, the (t, eps) draws, whole groups in every minibatch, and the offline mode's dataset
(written once, reused on resume, no sampling while training) on the toy world."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import toy
from flowjax import sharding
from flowjax.data.sampler import KRepeatSampler
from flowjax.rl import gdro as gdro_lib
from flowjax.rl.method import Context
from flowjax.rl.trainer import validate
from flowjax.train import build
from test_methods import PARAMS, REF, cond, linear_apply  # noqa: F401  (the tiny linear velocity model)

# Jitted once per shape (eager JAX compiles every primitive separately: slow on a busy CPU).
loss_and_grad = jax.jit(jax.value_and_grad(gdro_lib.gdro_loss), static_argnums=2)
objective = jax.jit(gdro_lib.gdro_objective, static_argnames=("group_size", "beta", "tau", "gamma"))
draws = jax.jit(gdro_lib.gdro_draws, static_argnums=(1, 2, 3),
                static_argnames=("num_draws", "shared", "timesteps", "timestep_fraction"))

# ----------------------------------------------------------------------------- float64 NumPy re-derivations


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


def np_gdro_loss(s, r, tau):
    """The paper's ranking loss, item by item: rank the group by reward (best first, ties in row order); at
    each stage the target over the items not yet ranked is softmax(r / tau) over them, the model's
    softmax(s) over them; the loss is the sum of the stages' cross-entropies, averaged over groups."""
    s, r = np.asarray(s, np.float64), np.asarray(r, np.float64)
    losses, grads = [], np.zeros_like(s)
    for g in range(s.shape[0]):
        order = np.argsort(-r[g], kind="stable")
        total = 0.0
        for j in range(s.shape[1] - 1):
            rest = order[j:]
            p = np.exp(np_log_softmax(r[g, rest] / tau))
            log_q = np_log_softmax(s[g, rest])
            total -= np.sum(p * log_q)
            grads[g, rest] += np.exp(log_q) - p  # d CE / d s over the remaining items
        losses.append(total)
    return np.mean(losses), grads / s.shape[0]


def np_errors(v, target):
    d = np.asarray(v, np.float64) - np.asarray(target, np.float64)
    return (d**2).reshape(len(d), -1).mean(1)


# ----------------------------------------------------------------------------- the ranking loss


@pytest.mark.parametrize("groups, k, tau", [(1, 2, 0.05), (3, 6, 0.05), (4, 5, 1.0), (2, 8, 0.3), (5, 3, 10.0)])
def test_gdro_loss_against_numpy(groups, k, tau):
    rng = np.random.default_rng(groups * 100 + k)
    s = rng.normal(scale=2.0, size=(groups, k))
    r = np.round(rng.uniform(size=(groups, k)), 1)  # rounded: ties occur
    ours, grad = loss_and_grad(jnp.asarray(s, jnp.float32), jnp.asarray(r, jnp.float32), tau)
    ref, ref_grad = np_gdro_loss(s, r, tau)
    np.testing.assert_allclose(float(ours), ref, rtol=2e-6)
    np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-4, atol=1e-6)


def test_reduces_to_diffusion_dpo_for_two_images():
    """k = 2, tau -> 0: the target is the winner and the loss is -log sigmoid(s_w - s_l); with the implicit
    rewards of velocities it is Diffusion-DPO's eq. 14 (Wallace et al. 2023) in flow-matching form,
    -log sigmoid(-beta [(|v_w - v_theta(x_w)|^2 - |v_w - v_ref(x_w)|^2) - (same for l)]), beta T omega(lambda_t)
    folded into beta (SalesforceAIResearch/DiffusionDPO train.py takes its errors as means over the pixels)."""
    rng = np.random.default_rng(0)
    s = rng.normal(size=(7, 2))
    r = rng.uniform(size=(7, 2))
    w, l = np.argmax(r, 1), np.argmin(r, 1)
    rows = np.arange(7)
    dpo = np.mean(np.logaddexp(0.0, -(s[rows, w] - s[rows, l])))  # -log sigmoid(s_w - s_l)
    ours, _ = loss_and_grad(jnp.asarray(s, jnp.float32), jnp.asarray(r, jnp.float32), 1e-6)
    np.testing.assert_allclose(float(ours), dpo, rtol=1e-6)

    # The whole objective (gamma 0) on velocities: 3 pairs of 4x4x3 "images".
    beta = 6.0
    target, v_theta, v_ref = (rng.normal(size=(6, 4, 4, 3)) for _ in range(3))
    rewards = np.asarray([0.9, 0.1, 0.2, 0.7, 1.0, 0.0])
    loss, metrics = objective(*(jnp.asarray(a, jnp.float32) for a in (v_theta, v_ref, target, rewards)),
                              group_size=2, beta=beta, tau=1e-6, gamma=0.0)
    e_t, e_r = np_errors(v_theta, target), np_errors(v_ref, target)
    terms = []
    for a, b in ((0, 1), (2, 3), (4, 5)):
        win, lose = (a, b) if rewards[a] > rewards[b] else (b, a)
        inside = -beta * ((e_t[win] - e_r[win]) - (e_t[lose] - e_r[lose]))
        terms.append(np.logaddexp(0.0, -inside))
    np.testing.assert_allclose(float(loss), np.mean(terms), rtol=1e-5)
    assert float(metrics["fm_loss"]) > 0 and float(metrics["loss"]) == pytest.approx(float(metrics["rank_loss"]))


def test_loss_refuses_bad_input():
    with pytest.raises(ValueError, match="tau must be > 0"):
        gdro_lib.gdro_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), 0.0)
    with pytest.raises(ValueError, match=r"\[groups, k\]"):
        gdro_lib.gdro_loss(jnp.zeros((6,)), jnp.zeros((6,)), 0.05)


# ----------------------------------------------------------------------------- the method on the linear model


def gdro_method(**section):
    c = toy.get_config("gdro")
    c.train.update(prompts_per_batch=3, group_size=2, minibatches=1)
    c.gdro.update(section)
    from flowjax.rl.method import build_method

    validate(c)
    return build_method(c), c


def np_objective(params, x0, t, eps, rewards, cd, beta, tau, gamma, k, expectation="inside"):
    """float64 NumPy GDRO objective of the linear model over draws t [K, B], eps [K, B, ...]: per image the
    flow-matching errors of policy and reference; "inside": implicit rewards from the errors averaged over the
    draws, then the ranking loss and the best image's error; "outside": that loss per draw, averaged."""
    w, b = (np.asarray(params[n], np.float64) for n in ("w", "b"))
    x0, pooled = np.asarray(x0, np.float64), np.asarray(cd.pooled, np.float64)
    errs = []
    for t_d, eps_d in zip(np.asarray(t, np.float64), np.asarray(eps, np.float64)):
        tt = t_d.reshape(-1, 1, 1, 1)
        x_t = (1 - tt) * x0 + tt * eps_d
        lin = lambda w_, b_: x_t * w_ + pooled[:, None, None, :] * b_ + tt * 0.3
        errs.append((np_errors(lin(w, b), eps_d - x0),
                     np_errors(lin(np.asarray(REF["w"], np.float64), np.asarray(REF["b"], np.float64)), eps_d - x0)))

    def loss(e_theta, e_ref):
        s = -beta * (e_theta - e_ref)
        rank, _ = np_gdro_loss(s.reshape(-1, k), np.asarray(rewards).reshape(-1, k), tau)
        best = np.argmax(np.asarray(rewards).reshape(-1, k), 1)
        return rank + gamma * np.mean(e_theta.reshape(-1, k)[np.arange(len(best)), best]), s

    if expectation == "inside":
        return loss(np.mean([e for e, _ in errs], 0), np.mean([r for _, r in errs], 0))
    per_draw = [loss(e, r) for e, r in errs]
    return np.mean([l for l, _ in per_draw]), np.mean([s for _, s in per_draw], 0)


def method_grads(method, c, key, rewards):
    cd = cond()
    x0 = jax.random.normal(jax.random.key(4), (6, 4, 4, 3))
    mb = {"x0": x0, "cond": cd, "advantages": method.advantages(rewards, jnp.asarray([0, 0, 1, 1, 2, 2]), 3, {}),
          "weights": jnp.ones((6,))}
    sig = method.schedule(c.sample.num_steps, c.sample.shift)
    grads, metrics = jax.jit(lambda p, m, kk: method.grads(Context(linear_apply, REF, sig), p, None, m, None, kk))(
        PARAMS, mb, key)
    return grads, metrics, x0, cd


@pytest.mark.parametrize("shared, expectation, draws_", [(True, "inside", 3), (False, "outside", 2)])
def test_grads_against_numpy_on_the_linear_model(shared, expectation, draws_):
    """The method's loss, implicit rewards and gradient on the linear velocity model of test_methods.py against
    float64 NumPy (the gradient by central differences), at the method's own (t, eps) draws."""
    beta, tau, gamma, k = 6.0, 0.05, 1.0, 2
    method, c = gdro_method(beta=beta / 1000.0, beta_T=1000.0, tau=tau, gamma=gamma, num_train_timesteps=draws_,
                            shared_noise=shared, expectation=expectation)
    rewards = jnp.asarray([0.2, 0.9, 0.5, 0.5, 1.0, 0.0])
    key = jax.random.key(7)
    grads, metrics, x0, cd = method_grads(method, c, key, rewards)
    t, eps = draws(key, 3, k, tuple(x0.shape[1:]), num_draws=draws_, shared=shared)
    args = (x0, t, eps, rewards, cd, beta, tau, gamma, k, expectation)
    ref_loss, s = np_objective(PARAMS, *args)
    np.testing.assert_allclose(float(metrics["loss"]), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["implicit_reward_mean"]), s.mean(), rtol=1e-4, atol=1e-6)
    assert set(metrics) == set(method.metric_names)
    h = 1e-5
    for name in ("w", "b"):
        for i in range(3):
            up, down = ({**PARAMS, name: np.asarray(PARAMS[name], np.float64).copy()} for _ in range(2))
            up[name][i] += h
            down[name][i] -= h
            fd = (np_objective(up, *args)[0] - np_objective(down, *args)[0]) / (2 * h)
            np.testing.assert_allclose(float(grads[name][i]), fd, rtol=2e-3, atol=1e-5, err_msg=f"{name}[{i}]")


def test_padding_rows_and_micro_calls_train_what_the_whole_minibatch_does():
    """The trainer pads a minibatch with weight-0 rows (to a multiple of the devices) and splits it into
    `train.micro_batch` calls of whole groups, combined by their weights: both give the whole minibatch's loss
    and gradient (the padding forms weight-0 groups; the (t, eps) draws are keyed by the rows' positions)."""
    method, c = gdro_method(num_train_timesteps=2, expectation="inside")
    rewards = jnp.asarray([0.2, 0.9, 0.5, 0.5, 1.0, 0.0])
    x0 = jax.random.normal(jax.random.key(4), (6, 4, 4, 3))
    cd = cond()
    adv = method.advantages(rewards, jnp.asarray([0, 0, 1, 1, 2, 2]), 3, {})
    sig = method.schedule(c.sample.num_steps, c.sample.shift)
    run = jax.jit(lambda p, m, kk: method.grads(Context(linear_apply, REF, sig), p, None, m, None, kk))
    key = jax.random.key(3)

    def mb(rows, weights=None):
        rows = np.asarray(rows)
        return {"x0": x0[rows], "cond": cd.rows(rows), "advantages": adv[rows],
                "weights": jnp.ones((len(rows),)) if weights is None else jnp.asarray(weights, jnp.float32)}

    whole_g, whole_m = run(PARAMS, {**mb(range(6)), "pos": jnp.arange(6)}, key)
    # 3 padding rows (the first rows again, weight 0, as np.resize pads): 9 rows, not a multiple of k = 2
    pad_g, pad_m = run(PARAMS, {**mb([0, 1, 2, 3, 4, 5, 0, 1, 2], [1] * 6 + [0] * 3), "pos": jnp.arange(9)}, key)
    # two calls of whole groups (the second padded with a weight-0 group: one shape, one compile), the rows'
    # positions in the minibatch, combined with the weights of their real rows (4 and 2)
    a_g, a_m = run(PARAMS, {**mb([0, 1, 2, 3]), "pos": jnp.arange(4)}, key)
    b_g, b_m = run(PARAMS, {**mb([4, 5, 0, 1], [1, 1, 0, 0]), "pos": jnp.arange(4, 8)}, key)
    for name in ("w", "b"):
        np.testing.assert_allclose(np.asarray(pad_g[name]), np.asarray(whole_g[name]), rtol=1e-5, atol=1e-8)
        split = (4 * np.asarray(a_g[name]) + 2 * np.asarray(b_g[name])) / 6
        np.testing.assert_allclose(split, np.asarray(whole_g[name]), rtol=1e-5, atol=1e-8)
    for m in ("loss", "rank_loss", "fm_loss", "policy_error"):
        np.testing.assert_allclose(float(pad_m[m]), float(whole_m[m]), rtol=1e-5, err_msg=m)
        np.testing.assert_allclose((4 * float(a_m[m]) + 2 * float(b_m[m])) / 6, float(whole_m[m]), rtol=1e-5,
                                   err_msg=m)
    c.train.micro_batch = 3  # a gradient call must hold whole groups of k = 2
    with pytest.raises(ValueError, match="multiple of train.group_size"):
        validate(c)


def test_one_draw_inside_equals_outside():
    """With one (t, eps) draw the expectation inside the implicit reward and Diffusion-DPO's outside agree."""
    rewards = jnp.asarray([0.2, 0.9, 0.5, 0.5, 1.0, 0.0])
    out = []
    for expectation in ("inside", "outside"):
        method, c = gdro_method(num_train_timesteps=1, expectation=expectation)
        out.append(method_grads(method, c, jax.random.key(9), rewards)[:2])
    (g_in, m_in), (g_out, m_out) = out
    for name in ("w", "b"):
        np.testing.assert_allclose(np.asarray(g_in[name]), np.asarray(g_out[name]), rtol=1e-5, atol=1e-8)
    for key in m_in:
        np.testing.assert_allclose(float(m_in[key]), float(m_out[key]), rtol=1e-5, atol=1e-8, err_msg=key)


def test_implicit_reward_sign_and_scale():
    """s = -beta (|v - v_theta|^2 - |v - v_ref|^2): 0 for the reference itself, beta |v - v_ref|^2 for a policy
    that predicts the target exactly, negative for one that fits worse than the reference."""
    cd = cond()
    x_t = jax.random.normal(jax.random.key(1), (6, 4, 4, 3))
    target = jax.random.normal(jax.random.key(2), (6, 4, 4, 3))
    tt = jnp.full((6,), 500.0)
    v_ref = linear_apply(REF, x_t, tt, cd.ctx, cd.pooled)
    v_pol = linear_apply(PARAMS, x_t, tt, cd.ctx, cd.pooled)
    e_ref = np_errors(v_ref, target)
    np.testing.assert_allclose(np.asarray(gdro_lib.implicit_rewards(v_ref, v_ref, target, 6.0)), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gdro_lib.implicit_rewards(target, v_ref, target, 6.0)), 6.0 * e_ref,
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gdro_lib.implicit_rewards(v_pol, v_ref, target, 12.0)),
                               -12.0 * (np_errors(v_pol, target) - e_ref), rtol=1e-4, atol=1e-6)
    worse = gdro_lib.implicit_rewards(v_ref + 1.0, v_ref, target, 6.0)
    assert np.all(np.asarray(worse) < np.asarray(gdro_lib.implicit_rewards(v_ref, v_ref, target, 6.0)) + 1e-6)


def test_shared_and_independent_draws():
    sig = jnp.linspace(1.0, 0.0, 9)
    t, eps = draws(jax.random.key(0), 3, 4, (2, 2, 1), num_draws=5, shared=True)
    assert t.shape == (5, 12) and eps.shape == (5, 12, 2, 2, 1)
    tg, eg = t.reshape(5, 3, 4), eps.reshape(5, 3, 4, -1)
    assert np.all(tg == tg[:, :, :1]) and np.all(eg == eg[:, :, :1])  # the same t, eps within a group
    assert len(np.unique(np.asarray(tg[:, :, 0]))) == 15  # and fresh ones per group and draw
    t, eps = draws(jax.random.key(0), 3, 4, (2, 2, 1), num_draws=5, shared=False)
    assert len(np.unique(np.asarray(t))) == 60 and len(np.unique(np.asarray(eps[:, :, 0, 0, 0]))) == 60
    t, _ = draws(jax.random.key(1), 50, 2, (1,), num_draws=4, timesteps="schedule", sigmas=sig, timestep_fraction=0.5)
    assert set(np.round(np.asarray(t), 6).ravel()) == set(np.round(np.asarray(sig[:4]), 6))


def test_minibatches_hold_whole_groups():
    prompts_per_batch, k, minibatches = 6, 4, 3
    _, groups = KRepeatSampler(20, prompts_per_batch, k, seed=3).batch(5)
    order, weights = jax.jit(gdro_lib.group_plan, static_argnums=2)(jnp.asarray(groups, jnp.float32),
                                                                     jax.random.key(0), k)
    order = np.asarray(order)
    assert sorted(order.tolist()) == list(range(24)) and np.all(np.asarray(weights) == 1.0)
    for mb in order.reshape(minibatches, -1):
        g = groups[mb].reshape(-1, k)
        assert np.all(g == g[:, :1])  # consecutive rows of one group
    c = toy.get_config("gdro")
    c.train.update(prompts_per_batch=4, minibatches=8)
    with pytest.raises(ValueError, match="whole groups"):
        validate(c)
    c = toy.get_config("gdro")
    c.gdro.tau = 0.0
    with pytest.raises(ValueError, match="tau > 0"):
        validate(c)


def test_toy_and_shapes_variants_validate_and_compare_labels_them():
    from configs import shapes
    from flowjax.compare import LABELS

    for module in (toy, shapes):
        for variant in ("gdro", "gdro_offline"):
            c = module.get_config(variant)
            validate(c)
            assert c.method == "gdro" and c.gdro.offline == (variant == "gdro_offline") and c.train.group_size
    c = shapes.get_config("gdro")
    assert (c.train.group_size, c.gdro.tau, c.gdro.beta, c.gdro.gamma) == (6, 0.05, 6.0, 1.0)
    assert LABELS["gdro"] == "GDRO (online)" and LABELS["gdro_offline"] == "GDRO (offline)"


# ----------------------------------------------------------------------------- offline mode on the toy world


def single_device_mesh():
    return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def test_rollout_store_resumes_and_refuses_other_settings(tmp_path):
    """The dataset's files (numpy only): missing batches are listed (a run killed while sampling resumes with
    them), epochs are a pure function of (seed, epoch) and cover every stored group once per pass, and a dataset
    sampled with other settings is refused."""
    from flowjax.rl.rollout_store import RolloutStore

    meta = dict(num_batches=3, prompts_per_batch=2, group_size=3, seed=5)
    store = RolloutStore(tmp_path / "rollouts", meta)
    store.check_meta()
    sampler = KRepeatSampler(10, 2, 3, seed=5)
    for i in (0, 2):
        p, g = sampler.batch(i)
        store.write(i, p, g, {"x0": np.full((6, 2), float(i))}, {"reward": np.arange(6.0) + 10 * i})
    assert store.missing() == [1]
    with pytest.raises(FileNotFoundError, match="1 of the 3 batches"):
        store.load()
    p, g = sampler.batch(1)
    store.write(1, p, g, {"x0": np.full((6, 2), 1.0)}, {"reward": np.arange(6.0) + 10})
    data = RolloutStore(tmp_path / "rollouts", meta).load()
    assert data.steps_per_pass == 3
    seen = []
    for step in range(3):
        prompts, groups, keep, scores = data.epoch(step)
        again = data.epoch(step)
        np.testing.assert_array_equal(prompts, again[0])
        np.testing.assert_array_equal(keep["x0"], again[2]["x0"])
        np.testing.assert_array_equal(groups, [0, 0, 0, 1, 1, 1])
        for grp in scores["reward"].reshape(2, 3):  # a stored group: one batch, one group's rows
            assert len({int(x) // 10 for x in grp}) == 1
            seen.append(tuple(grp))
    assert len(set(seen)) == 6  # a pass covers every stored group once
    with pytest.raises(ValueError, match="sampled with other settings"):
        RolloutStore(tmp_path / "rollouts", {**meta, "group_size": 4}).check_meta()


@pytest.mark.slow
def test_offline_dataset_is_sampled_once_and_reused(tmp_path):
    """gdro_offline: the dataset (offline_batches batches sampled by the reference policy) is written to
    WORKDIR/rollouts/ at the first epoch, its cost logged once; a resumed run reuses the files and samples
    nothing; a run with other settings is refused."""
    c = toy.get_config("gdro_offline")
    c.train.update(steps=3, prompts_per_batch=2, group_size=4)
    c.gdro.offline_batches = 3
    c.eval_every = c.checkpoint_every = 2
    trainer = build(c, tmp_path, mesh=single_device_mesh())
    trainer.train(num_steps=2)
    trainer.close()
    files = sorted((tmp_path / "rollouts").glob("batch_*.npz"))
    assert [f.name for f in files] == [f"batch_{i:06d}.npz" for i in range(3)]
    stamps = [f.stat().st_mtime_ns for f in files]
    with np.load(files[0]) as f:
        assert f["keep/x0"].shape == (8, 8, 8, 4) and f["scores/reward"].shape == (8,)
        np.testing.assert_array_equal(f["group_ids"], KRepeatSampler(8, 2, 4, seed=0).batch(0)[1])

    trainer = build(c, tmp_path, mesh=single_device_mesh())  # resumes at step 2
    calls = []
    rollout = trainer._rollout
    trainer._rollout = lambda *a: calls.append(1) or rollout(*a)
    trainer.train()
    trainer.close()
    assert not calls and [f.stat().st_mtime_ns for f in files] == stamps
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    per_batch = c.sample.num_steps * 2 * 8  # CFG pair x 8 images
    assert rows[1]["nfe/dataset"] == 3 * per_batch and rows[1]["images/sampled"] == 24
    assert all("nfe/dataset" not in r and r["images/sampled"] == 0 and r["nfe/rollout"] == 0 for r in rows[2:])
    assert all(np.isfinite(r["loss"]) for r in rows[1:])

    c.gdro.offline_batches = 4
    trainer = build(c, tmp_path, mesh=single_device_mesh())
    try:
        with pytest.raises(ValueError, match="sampled with other settings"):
            trainer._prepare_stored_rollouts()
    finally:
        trainer.close()


@pytest.mark.slow
def test_micro_batched_runs_equal_whole_ones(tmp_path):
    """sample.micro_batch (the offline dataset's rollouts and the online ones) and train.micro_batch (gradient
    calls of whole groups) change nothing: the stored dataset and the trained parameters after one epoch match
    an unsplit run's."""
    out = {}
    for variant in ("gdro", "gdro_offline"):
        for micro in (0, 1):
            c = toy.get_config(variant)
            c.train.update(steps=1, prompts_per_batch=2, group_size=4, minibatches=1, grad_accum=1,
                           micro_batch=4 * micro)
            c.sample.micro_batch = 2 * micro
            c.gdro.offline_batches = 1
            c.eval_every = c.checkpoint_every = 1
            work = tmp_path / f"{variant}_{micro}"
            trainer = build(c, work, mesh=single_device_mesh())
            assert (trainer.micro_rows, trainer.train_calls) == ((2, 2) if micro else (0, 1))
            trainer.train_step()
            out[variant, micro] = jax.device_get(trainer.state.params)
            trainer.close()
        for a, b in zip(jax.tree.leaves(out[variant, 0]), jax.tree.leaves(out[variant, 1])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    with np.load(tmp_path / "gdro_offline_0" / "rollouts" / "batch_000000.npz") as f0, \
            np.load(tmp_path / "gdro_offline_1" / "rollouts" / "batch_000000.npz") as f1:
        for name in f0.files:
            np.testing.assert_allclose(f0[name], f1[name], rtol=1e-5, atol=1e-6, err_msg=name)
