"""python -m flowjax.prm --config=configs/shapes.py:euphonium --workdir=DIR [--rollouts=2048 --steps=3000 ...]

Trains a latent process reward model (flowjax.models.prm) for a world and its base model, as Euphonium's
guide: rollouts of the base model with the config's Euphonium sampler (unguided), each noisy latent x_t of
every step (and the final sample at sigma 0) paired with its prompt's conditioning and the rollout's final
reward, then a least-squares regression of the reward on (x_t, sigma_t, prompt). A fifth of the rollouts is
held out (whole groups): the Pearson correlation of the PRM's scores with the final rewards on them, overall, per step and
within groups of one prompt (scores and rewards centred per group and step, what the process advantages see), is
printed and stored in DIR/prm/config.json with how the PRM was trained. Point the config at it with
--config.euphonium.guide.path=DIR/prm. DIR/sampler holds the trainer's record of the base policy and
DIR/rollouts.npz the sampled rollouts (a rerun reads them instead of sampling again).

The regression target is the expected final reward given x_t (Euphonium's latent PRM scores noisy latents at
any timestep, zerzerzerz/Euphonium@d9f2c39 latent_sub_reward.py); its training recipe is not public (the
Latent_PRM submodule), so this one is our own: mean squared error, AdamW, cosine-decayed learning rate.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from flowjax.models import prm as prm_lib


def collect(trainer, rollouts: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rollouts of the trainer's policy with its method's sampler, in groups of `train.group_size` rollouts of one
    prompt (prompts drawn at random): {"latents" [N, T+1, ...], "prompts" [N], "groups" [N], "rewards" [N],
    "sigmas" [T+1]}, N = `rollouts` rounded up to whole batches."""
    world, batch, group = trainer.world, trainer.batch_size, int(trainer.config.train.group_size)
    calls = -(-rollouts // batch)
    rng = np.random.default_rng(seed)
    ids_all = np.repeat(rng.integers(0, world.num_prompts, calls * batch // group), group)
    key = jax.random.PRNGKey(seed)
    window = trainer.method.window(0, key)
    params = trainer.state.params
    latents, prompts, rewards = [], [], []
    for i in range(calls):
        ids = ids_all[i * batch:(i + 1) * batch]
        rows = np.arange(batch, dtype=np.int32)
        k_noise, k_sample = jax.random.split(jax.random.fold_in(key, i))
        keep, samples = trainer._rollout(params, trainer.frozen, trainer._cond(ids), trainer._global(rows),
                                         trainer._global(rows), k_noise, k_sample, window,
                                         trainer._global(ids.astype(np.int32)), trainer.guide_state)
        scores = trainer._score(samples, trainer._global(ids.astype(np.int32)), getattr(world, "state", None))
        latents.append(np.asarray(jax.device_get(keep["latents"]), np.float32))
        rewards.append(np.asarray(jax.device_get(scores["reward"]), np.float32))
        prompts.append(ids)
    return {"latents": np.concatenate(latents), "prompts": np.concatenate(prompts),
            "groups": np.arange(calls * batch) // group, "rewards": np.concatenate(rewards),
            "sigmas": np.asarray(trainer.rollout_sigmas, np.float32)}


def correlations(pred: np.ndarray, target: np.ndarray, groups: np.ndarray) -> dict:
    """Pearson r of predictions [N, S] (S = steps) with targets [N]: overall, per step, and within groups (the
    rollouts of one prompt; both centred per group and step, as the process advantages see them)."""
    pearson = lambda a, b: float(np.corrcoef(a, b)[0, 1]) if np.std(a) > 0 and np.std(b) > 0 else 0.0
    tgt = np.broadcast_to(target[:, None], pred.shape)
    centred_p, centred_t = pred.astype(np.float64), tgt.astype(np.float64)
    for g in np.unique(groups):
        rows = groups == g
        centred_p[rows] -= pred[rows].mean(0)
        centred_t[rows] -= tgt[rows].mean(0)
    return {"overall": pearson(pred.ravel(), tgt.ravel()),
            "per_step": [pearson(pred[:, s], tgt[:, s]) for s in range(pred.shape[1])],
            "within_group_per_step": [pearson(centred_p[:, s], centred_t[:, s]) for s in range(pred.shape[1])]}


def train_prm(data: dict, encode, *, in_channels: int, text_dim: int, pooled_dim: int, steps: int = 3000,
              batch_size: int = 256, lr: float = 1e-3, width: int = 16, heldout: float = 0.2, seed: int = 0,
              log=print) -> tuple[prm_lib.LatentPRM, dict]:
    """Regresses the final rewards on every (x_t, sigma_t, prompt) of the training rollouts; returns the PRM and
    its held-out fit (`correlations` of the held-out rollouts, and the mean squared errors)."""
    lat, prompts, rewards, sig = data["latents"], data["prompts"], data["rewards"], data["sigmas"]
    groups = data.get("groups", np.arange(len(rewards)))
    n, s = lat.shape[:2]
    rng = np.random.default_rng(seed)
    names = rng.permutation(np.unique(groups))
    test_groups = names[:max(1, int(round(len(names) * heldout)))]
    is_test = np.isin(groups, test_groups)
    test, train = np.flatnonzero(is_test), np.flatnonzero(~is_test)
    n_test = len(test)
    if len(train) < 1:
        raise ValueError(f"{n} rollouts leave none to train on after holding out {heldout:.0%}; sample more")
    config = prm_lib.LatentPRMConfig(in_channels=in_channels, text_dim=text_dim, pooled_dim=pooled_dim, width=width)
    graphdef, params = nnx.split(prm_lib.initialise(config, seed))
    schedule = optax.cosine_decay_schedule(lr, steps)
    opt = optax.adamw(schedule, weight_decay=1e-4)
    opt_state = opt.init(params)

    def predict(p, x, t, ctx, pooled):
        return nnx.merge(graphdef, p)(x, t, ctx, pooled)

    @jax.jit
    def update(p, o, x, t, ctx, pooled, r):
        loss, g = jax.value_and_grad(lambda q: jnp.mean((predict(q, x, t, ctx, pooled) - r) ** 2))(p)
        upd, o = opt.update(g, o, p)
        return optax.apply_updates(p, upd), o, loss

    scores = jax.jit(predict)
    t0, losses = time.perf_counter(), []
    for i in range(steps):
        rows = train[rng.integers(0, len(train), batch_size)]
        step = rng.integers(0, s, batch_size)
        ctx, pooled = encode(prompts[rows])
        params, opt_state, loss = update(params, opt_state, lat[rows, step], sig[step], ctx, pooled, rewards[rows])
        losses.append(float(loss))
        if (i + 1) % max(1, steps // 10) == 0:
            log(f"prm step {i + 1}/{steps}: mse {np.mean(losses[-100:]):.5f} ({time.perf_counter() - t0:.0f} s)")

    def predict_all(idx):
        out = np.zeros((len(idx), s), np.float32)
        for j in range(0, len(idx), batch_size):
            rows = np.resize(idx[j:j + batch_size], batch_size)  # one shape: one compiled program
            ctx, pooled = encode(prompts[rows])
            n_real = min(batch_size, len(idx) - j)
            for t in range(s):
                pred = scores(params, lat[rows, t], np.full(batch_size, sig[t], np.float32), ctx, pooled)
                out[j:j + n_real, t] = np.asarray(pred)[:n_real]
        return out

    pred = predict_all(test)
    fit = {"heldout": correlations(pred, rewards[test], groups[test]),
           "heldout_mse_per_step": [float(np.mean((pred[:, t] - rewards[test]) ** 2)) for t in range(s)],
           "reward_variance": float(np.var(rewards[test])), "train_seconds": time.perf_counter() - t0,
           "rollouts": {"train": int(len(train)), "heldout": int(n_test)}, "sigmas": [float(x) for x in sig]}
    return nnx.merge(graphdef, params), fit


# ------------------------------------------------------------------------------------ entry point


def main(argv):
    del argv
    from flowjax.train import build

    config = flags.FLAGS.config
    if config.method != "euphonium":
        raise ValueError(f"flowjax.prm trains the guide of a Euphonium config (config.method='euphonium'), got "
                         f"{config.method!r}: pass CONFIG:euphonium")
    workdir = Path(flags.FLAGS.workdir)
    # The base model samples without a guide (the PRM does not exist yet) and without process advantages.
    config.euphonium.guide.source = "none"
    config.euphonium.process_coef = 0.0
    trainer = build(config, workdir / "sampler")
    try:
        t0 = time.perf_counter()
        cache = workdir / "rollouts.npz"  # the sampled rollouts, reused by a rerun with other PRM settings
        if cache.is_file():
            data = dict(np.load(cache))
            print(f"read {len(data['rewards'])} rollouts from {cache} (delete it to sample afresh)")
        else:
            data = collect(trainer, flags.FLAGS.rollouts, flags.FLAGS.seed)
            np.savez(cache, **data)
        sample_s = time.perf_counter() - t0
        print(f"sampled {len(data['rewards'])} rollouts in {sample_s:.0f} s; reward mean "
              f"{data['rewards'].mean():.3f} sd {data['rewards'].std():.3f}")
        world = trainer.world
        ctx, pooled = world.encode(np.zeros(1, np.int64))
        encode = lambda ids: tuple(np.asarray(a, np.float32) for a in world.encode(ids))
        model, fit = train_prm(data, encode, in_channels=world.channels, text_dim=np.shape(ctx)[-1],
                               pooled_dim=np.shape(pooled)[-1], steps=flags.FLAGS.steps,
                               batch_size=flags.FLAGS.batch_size, lr=flags.FLAGS.lr, width=flags.FLAGS.width,
                               seed=flags.FLAGS.seed)
    finally:
        trainer.close()
    meta = {"variant": config.get("variant"), "world": config.world.get("name", "toy"), "sampler": {
                "kind": config.euphonium.kind, "noise_level": config.euphonium.noise_level,
                "num_steps": config.sample.num_steps, "shift": config.sample.shift,
                "schedule": config.euphonium.schedule, "guidance": config.euphonium.guidance},
            "training": {"rollouts": int(len(data["rewards"])), "steps": flags.FLAGS.steps, "lr": flags.FLAGS.lr,
                         "batch_size": flags.FLAGS.batch_size, "seed": flags.FLAGS.seed, "sample_seconds": sample_s},
            "fit": fit}
    out = prm_lib.save(model, workdir / "prm", meta)
    h = fit["heldout"]
    print(f"held-out Pearson r: overall {h['overall']:.3f}; per step "
          f"{', '.join(f'{r:.2f}' for r in h['per_step'])}; within groups "
          f"{', '.join(f'{r:.2f}' for r in h['within_group_per_step'])}")
    print(f"wrote {out}; use it with --config.euphonium.guide.path={out}")


if __name__ == "__main__":
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "a config with a euphonium variant, e.g. configs/shapes.py:euphonium")
    flags.DEFINE_string("workdir", None, "output folder: DIR/prm (the PRM), DIR/sampler (the base policy's record)")
    flags.DEFINE_integer("rollouts", 2048, "base-model rollouts to regress on (rounded up to whole batches)")
    flags.DEFINE_integer("steps", 3000, "PRM optimizer steps")
    flags.DEFINE_integer("batch_size", 256, "(x_t, sigma_t, prompt) examples per PRM step")
    flags.DEFINE_float("lr", 1e-3, "peak AdamW learning rate (cosine-decayed to 0)")
    flags.DEFINE_integer("width", 16, "channels of the PRM's first conv stage")
    flags.DEFINE_integer("seed", 0, "seed of the rollouts, the held-out split and the PRM's initialisation")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
