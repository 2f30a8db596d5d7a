"""The online RL loop: sample -> reward -> advantages -> jitted updates, sharded over a mesh.

One `Trainer` serves every method; the config picks it (`method`: grpo | awm | nft, with
`sample.kind` sde | cps | dance and an optional MixGRPO `sample.window_size` for grpo). The trainable
parameters (LoRA adapters, or all params for full fine-tuning), the optimizer state, the old/EMA
policy and the RNG live in one `TrainState` pytree that orbax checkpoints; the batch of a step is a
pure function of (seed, step), so a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from flowjax import plots, sampling
from flowjax import sharding as sharding_lib
from flowjax.data.sampler import KRepeatSampler
from flowjax.models import lora
from flowjax.models.prediction import check_prediction, to_velocity
from flowjax.rl import advantages as adv_lib
from flowjax.rl import awm, nft, steps

METHODS = ("grpo", "awm", "nft")


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # the trainable state (nnx.State)
    opt_state: Any
    old_params: Any  # nft: the old (sampling) policy; awm: the EMA policy; grpo: None
    key: jax.Array  # raw uint32 PRNG key (checkpointable)
    nan_steps: jax.Array


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """The hyper-parameters the jitted losses read, as hashable constants."""

    kind: str
    noise_level: float
    guidance: float
    clip_range: float
    beta: float
    adv_clip: float
    timestep_fraction: float
    p: float = 0.25
    num_train_timesteps: int = 6
    ema_beta: float = 0.0
    adv_scale: float = 5.0
    mix: float = 1.0
    kl_beta: float = 0.0


LR_SCHEDULES = ("constant", "cosine")


def learning_rate(train):
    """`train.lr`, constant (the references) or, with `train.lr_schedule="cosine"`, decayed to 0 over the
    run's optimizer updates (steps x minibatches / grad_accum): a short run then ends where its
    updates are small instead of mid-stride."""
    kind = train.get("lr_schedule", "constant")
    if kind == "constant":
        return train.lr
    updates = max(1, train.steps * train.minibatches // train.grad_accum)
    return optax.cosine_decay_schedule(train.lr, updates)


def validate(config) -> None:
    """Refuses impossible or contradictory configs with a message naming the fix."""
    m, s, t = config.method, config.sample, config.train
    if m not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {m!r}")
    if s.kind not in sampling.KINDS:
        raise ValueError(f"sample.kind must be one of {sampling.KINDS}, got {s.kind!r}")
    if m == "grpo" and s.kind == "ode":
        raise ValueError("method 'grpo' needs a stochastic sampler: set sample.kind to sde, cps or dance")
    if s.window_size and m != "grpo":
        raise ValueError(f"sample.window_size (MixGRPO) applies to method 'grpo' only, not {m!r}")
    if s.window_size and not 1 <= s.window_size <= s.num_steps:
        raise ValueError(f"sample.window_size must be in [1, sample.num_steps={s.num_steps}], got {s.window_size}")
    max_start = s.get("window_max_start")
    if s.window_size and max_start is not None and not 0 <= max_start <= s.num_steps - s.window_size:
        raise ValueError(f"sample.window_max_start must be in [0, num_steps - window_size = "
                         f"{s.num_steps - s.window_size}], got {max_start}")
    if m == "nft" and s.guidance != 1.0:
        raise ValueError("DiffusionNFT samples CFG-free: set sample.guidance=1.0")
    if m == "grpo" and int(s.num_steps * t.timestep_fraction) < 1 and not s.window_size:
        raise ValueError("train.timestep_fraction * sample.num_steps leaves no timestep to train")
    if t.get("lr_schedule", "constant") not in LR_SCHEDULES:
        raise ValueError(f"train.lr_schedule must be one of {LR_SCHEDULES}, got {t.lr_schedule!r}")
    batch = t.prompts_per_batch * t.group_size
    if batch % t.minibatches:
        raise ValueError(f"the batch ({t.prompts_per_batch} prompts x {t.group_size}) = {batch} is not divisible "
                         f"by train.minibatches={t.minibatches}")


def world_scores(world, samples, prompt_ids, world_state=None) -> dict:
    """Per-sample scores of a world: {"reward": [B], ...} (strict accuracy, reward components), with its
    weights (VAE, reward models) passed in as `world_state` so they are jit arguments, not constants."""
    return dict(world.score(samples, prompt_ids, state=world_state))


class MetricsWriter:
    """metrics.jsonl, one JSON object per logged step; on resume, lines past the restored step go
    (a fresh start, `restored_step` None, starts a fresh file)."""

    def __init__(self, path: Path, restored_step: int | None, enabled: bool, tensorboard: bool = True):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            last = -1 if restored_step is None else restored_step
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= last]
            path.write_text("".join(ln + "\n" for ln in kept))
        self.tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(path.parent / "tensorboard"), purge_step=(restored_step or 0) + 1)

    def write(self, step: int, metrics: dict) -> None:
        if self.enabled:
            row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            if self.tb is not None:
                for k, v in row.items():
                    if k != "step":
                        self.tb.add_scalar(k, v, int(step))
                self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()


class Trainer:
    """Wires model, world (conditioning + reward), sampler, optimizer, mesh and checkpoints from a config.

    `prediction` says what the model outputs ("velocity" as SD3.5, or "sample": the clean image, as
    the shapes base model); samplers and losses always see the velocity (flowjax.models.prediction).
    """

    def __init__(self, config, workdir, *, model: nnx.Module, world, mesh=None, prediction: str = "velocity"):
        validate(config)
        check_prediction(prediction)
        self.config, self.world = config, world
        self.workdir = Path(workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mesh = mesh or sharding_lib.make_mesh(dict(config.mesh))
        self.is_main = jax.process_index() == 0
        s, t = config.sample, config.train
        self.sampler = KRepeatSampler(world.num_prompts, t.prompts_per_batch, t.group_size, seed=config.seed)
        self.batch_size = self.sampler.batch_size
        dp = self._dp()
        if self.batch_size % dp or (self.batch_size // t.minibatches) % dp:
            raise ValueError(f"batch {self.batch_size} and minibatch {self.batch_size // t.minibatches} must divide "
                             f"evenly over the {dp} data-parallel devices of the mesh")
        self.sigmas = sampling.sigmas(s.num_steps, s.shift)
        self.eval_sigmas = sampling.sigmas(s.eval_num_steps, s.shift)
        self.method_cfg = MethodConfig(
            kind=s.kind, noise_level=float(s.noise_level), guidance=float(s.guidance),
            clip_range=t.clip_range, beta=t.beta, adv_clip=t.adv_clip, timestep_fraction=t.timestep_fraction,
            p=t.awm_p, num_train_timesteps=t.awm_num_train_timesteps, ema_beta=t.awm_ema_beta,
            adv_scale=t.awm_adv_scale, mix=t.nft_mix, kl_beta=t.nft_kl_beta,
        )

        # Trainable vs frozen; the reference policy is LoRA off (zero adapters) or the initial weights.
        if config.lora.rank > 0:
            lora.apply(model, lora.LoRAConfig(config.lora.rank, config.lora.alpha, tuple(config.lora.targets)),
                       rngs=nnx.Rngs(config.seed))
            trainable = nnx.LoRAParam
        else:
            trainable = nnx.Param
        graphdef, params, frozen = nnx.split(model, trainable, ...)
        rules = tuple(config.sharding_rules)
        params = sharding_lib.shard_state(params, self.mesh, rules)
        self.frozen = sharding_lib.shard_state(frozen, self.mesh, rules)
        self.ref_params = lora.disabled(params) if config.lora.rank > 0 else params
        def apply(p, x, timesteps, ctx, pooled, *, frozen):
            out = nnx.merge(graphdef, p, frozen)(x, timesteps, ctx, pooled)
            return to_velocity(out, x, timesteps / 1000.0, prediction)

        self.apply = apply

        self.optimizer = optax.MultiSteps(
            optax.chain(
                optax.clip_by_global_norm(t.max_grad_norm),
                optax.adamw(learning_rate(t), b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps,
                            weight_decay=t.weight_decay),
            ),
            every_k_schedule=t.grad_accum,
        )
        old = params if config.method in ("awm", "nft") else None
        self.state = TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=self.optimizer.init(params), old_params=old,
            key=jax.random.PRNGKey(config.seed), nan_steps=jnp.zeros((), jnp.int32),
        )
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(("data", "fsdp")))
        self._build_jitted()

        self.checkpoints = ocp.CheckpointManager(
            self.workdir / "checkpoints",
            options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, enable_async_checkpointing=True),
        )
        self.metrics = MetricsWriter(self.workdir / "metrics.jsonl", self._restore(), self.is_main,
                                     tensorboard=config.get("tensorboard", True))

    # ------------------------------------------------------------------ jitted functions

    def _build_jitted(self):
        cfg, sigmas, s = self.method_cfg, self.sigmas, self.config.sample

        def apply_with(frozen):
            return lambda p, *a: self.apply(p, *a, frozen=frozen)

        @jax.jit
        def rollout(params, frozen, cond, noise, key, window_start):
            window = None if not s.window_size else (window_start, window_start + s.window_size)
            return steps.rollout(apply_with(frozen), params, cond, noise, key, sigmas=sigmas, kind=cfg.kind,
                                 noise_level=cfg.noise_level, guidance=cfg.guidance, window=window)

        @jax.jit
        def evaluate(params, frozen, cond, noise):
            return steps.rollout(apply_with(frozen), params, cond, noise, None, sigmas=self.eval_sigmas, kind="ode",
                                 noise_level=0.0, guidance=float(s.eval_guidance)).latents[-1]

        method = self.config.method
        n_train = int(s.num_steps * cfg.timestep_fraction)

        @jax.jit
        def update(state: TrainState, frozen, ref_params, mb: steps.Minibatch, window_start, key):
            apply = apply_with(frozen)
            if method == "grpo":
                idx = (window_start + jnp.arange(s.window_size)) if s.window_size else jnp.arange(n_train)
                grads, metrics = steps.grpo_grads(apply, state.params, ref_params, mb, idx, key, cfg=cfg, sigmas=sigmas)
            elif method == "awm":
                grads, metrics = steps.awm_grads(apply, state.params, ref_params, state.old_params, mb, key,
                                                 cfg=cfg, sigmas=sigmas)
            else:
                grads, metrics = steps.nft_grads(apply, state.params, ref_params, state.old_params, mb, key,
                                                 cfg=cfg, sigmas=sigmas)
            # NaN guard: a non-finite loss or gradient skips the step (params and optimizer untouched).
            finite = jnp.isfinite(metrics["loss"]) & jnp.all(
                jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
            updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
            metrics["grad_norm"] = optax.global_norm(grads)
            return state.replace(params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
                                 nan_steps=state.nan_steps + (~finite).astype(jnp.int32)), metrics

        @jax.jit
        def end_of_epoch(state: TrainState):
            """The old / EMA policy follows the policy once per epoch, with a step-dependent decay."""
            if method == "awm":
                decay = awm.awm_ema_decay(state.step, max_decay=self.config.train.awm_ema_max_decay,
                                          rate=self.config.train.awm_ema_rate)
            elif method == "nft":
                decay = nft.old_policy_decay(state.step, self.config.train.nft_decay_type)
            else:
                return state.replace(step=state.step + 1)
            old = nft.ema_update(state.old_params, state.params, decay)
            return state.replace(old_params=old, step=state.step + 1)

        t = self.config.train

        @jax.jit
        def score(samples, prompt_ids, group_ids, world_state):
            """Rewards -> advantages over the global batch, and the reward statistics to log."""
            scores = world_scores(self.world, samples, prompt_ids, world_state)
            rewards = scores.pop("reward")
            advantages = adv_lib.group_advantages(rewards, group_ids, num_groups=t.prompts_per_batch,
                                                  std=t.adv_std, clip=None)  # each loss clips its own way
            stats = adv_lib.group_reward_stats(rewards, group_ids, num_groups=t.prompts_per_batch)
            return advantages, {"reward/mean": rewards.mean(), "reward/std": rewards.std(),
                                **{f"reward/{k}": jnp.nanmean(v) for k, v in scores.items()},
                                **{f"group/{k}": v for k, v in stats.items()}}

        eval_world = self.eval_world

        # Replicated outputs: every process reads the whole per-sample evaluation (multi-host safe).
        @functools.partial(jax.jit, out_shardings=NamedSharding(self.mesh, PartitionSpec()))
        def eval_scores(samples, prompt_ids, world_state):
            """Per-sample reward (and strict accuracy or reward components when the world has them)."""
            return world_scores(eval_world, samples, prompt_ids, world_state)

        self._rollout, self._evaluate, self._update, self._end_of_epoch = rollout, evaluate, update, end_of_epoch
        self._score, self._eval_scores = score, eval_scores

    # ------------------------------------------------------------------ data

    def _global(self, host_array):
        """A global array sharded over the batch axis from this process's rows of the global batch."""
        n = jax.process_count()
        rows = host_array.shape[0] // n
        local = host_array[jax.process_index() * rows:(jax.process_index() + 1) * rows]
        return jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(local), host_array.shape)

    def _cond(self, prompt_ids, world=None):
        world = world or self.world
        ctx, pooled = world.encode(jnp.asarray(prompt_ids))
        neg_ctx, neg_pooled = world.negative(len(prompt_ids))
        return steps.Cond(*(self._global(np.asarray(a, np.float32)) for a in (ctx, pooled, neg_ctx, neg_pooled)))

    def _noise(self, key, batch, group_ids=None):
        shape = (*self.config.sample.latent_size, self.world.channels)
        noise = np.asarray(jax.random.normal(key, (batch, *shape), jnp.float32))
        if self.config.sample.same_noise_per_group and group_ids is not None:
            noise = noise[np.asarray([np.flatnonzero(group_ids == g)[0] for g in group_ids])]
        return self._global(noise)

    # ------------------------------------------------------------------ loop

    @property
    def eval_world(self):
        """Where evaluation prompts come from: the world's held-out split when it has one."""
        return getattr(self.world, "eval_world", None) or self.world

    def eval_prompt_ids(self) -> tuple[np.ndarray, int]:
        """The fixed evaluation batch: the first `num_eval_prompts` prompts (0 = all), each
        `eval_samples_per_prompt` times, padded by repetition to a multiple of the devices; and the
        number of real (unpadded) rows, the only ones scored."""
        s, world = self.config.sample, self.eval_world
        n = world.num_prompts if not s.num_eval_prompts else min(s.num_eval_prompts, world.num_prompts)
        ids = np.repeat(np.arange(n), s.get("eval_samples_per_prompt", 1))
        return np.resize(ids, -(-len(ids) // self._dp()) * self._dp()), len(ids)

    def evaluate(self, grid_name: str | None = None) -> dict:
        """ODE samples of the evaluation prompts from fixed noise: mean reward and strict accuracy
        (per task too when the world names tasks), and a captioned grid under samples/ if asked."""
        ids, n = self.eval_prompt_ids()
        world = self.eval_world
        noise = self._noise(jax.random.PRNGKey(10_000 + self.config.seed), len(ids))
        samples = self._evaluate(self.state.params, self.frozen, self._cond(ids, world), noise)
        scores = jax.device_get(self._eval_scores(samples, self._global(ids.astype(np.int32)),
                                                  getattr(world, "state", None)))
        out = {f"eval/{k}_mean" if k == "reward" else f"eval/{k}": float(np.nanmean(v[:n])) for k, v in scores.items()}
        if "accuracy" in scores and hasattr(world, "task_names"):
            tasks = np.asarray(world.task_names(ids[:n]))
            for task in dict.fromkeys(tasks):
                out[f"eval/accuracy_{task}"] = float(np.mean(scores["accuracy"][:n][tasks == task]))
        if grid_name and hasattr(world, "images"):
            g = self.config.get("grid_size", 32)
            # Every process joins the replicated gather (multi-host); only process 0 draws.
            to_images = jax.jit(lambda x: world.images(x[:g]), out_shardings=NamedSharding(self.mesh, PartitionSpec()))
            images = np.asarray(jax.device_get(to_images(samples)))
        if grid_name and self.is_main and hasattr(world, "images"):
            correct = scores["accuracy"][:g] if "accuracy" in scores else None
            title = f"step {int(self.state.step)}" + (f": accuracy {out['eval/accuracy']:.2f}" if "eval/accuracy" in out else "")
            plots.save_grid(images, world.captions(ids[:g]), self.workdir / "samples" / grid_name, correct=correct,
                            title=title)
        return out

    def _dp(self):
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    def train_step(self) -> dict:
        """One epoch of the references: a batch of rollouts, then `minibatches` updates on it."""
        c, t = self.config, self.config.train
        step = int(self.state.step)
        prompt_ids, group_ids = self.sampler.batch(step)
        key = jax.random.fold_in(self.state.key, step)
        k_noise, k_sample, k_window, k_perm, k_train = jax.random.split(key, 5)
        window_start = (sampling.sample_window(k_window, c.sample.num_steps, c.sample.window_size,
                                               max_start=c.sample.get("window_max_start"))[0]
                        if c.sample.window_size else jnp.zeros((), jnp.int32))
        cond = self._cond(prompt_ids)
        sample_params = self.state.old_params if c.method == "nft" else self.state.params
        t0 = time.perf_counter()
        out = self._rollout(sample_params, self.frozen, cond, self._noise(k_noise, self.batch_size, group_ids),
                            k_sample, window_start)
        samples = out.latents[-1]
        advantages, reward_metrics = self._score(samples, self._global(prompt_ids.astype(np.int32)),
                                                 self._global(group_ids.astype(np.int32)),
                                                 getattr(self.world, "state", None))
        t_sample = time.perf_counter() - t0

        keep = out.latents if c.method == "grpo" else samples
        perm = np.asarray(jax.random.permutation(k_perm, self.batch_size))
        size = self.batch_size // t.minibatches
        logs = []
        for i in range(t.minibatches):
            rows = perm[i * size:(i + 1) * size]
            lat = keep[:, rows] if c.method == "grpo" else keep[rows]
            mb = steps.Minibatch(cond.rows(rows), lat, out.log_probs[:, rows], advantages[rows])
            self.state, m = self._update(self.state, self.frozen, self.ref_params, mb, window_start,
                                         jax.random.fold_in(k_train, i))
            logs.append(m)
        self.state = self._end_of_epoch(self.state)
        if int(self.state.nan_steps) > t.max_nan_steps:
            raise FloatingPointError(f"{int(self.state.nan_steps)} updates had a non-finite loss or gradient "
                                     f"(train.max_nan_steps={t.max_nan_steps}); lower train.lr or check the reward")
        metrics = {k: np.mean([float(m[k]) for m in logs]) for k in logs[0]}
        metrics.update(reward_metrics)
        metrics.update({"time/sample_s": t_sample, "time/step_s": time.perf_counter() - t0,
                        "nan_steps": self.state.nan_steps})
        return metrics

    def train(self, num_steps: int | None = None) -> None:
        """Runs to `train.steps` (or `num_steps` more). Evaluates before the first update, every
        `eval_every` steps and at the end, with sample grids at the first and the last evaluation;
        draws the curves of metrics.jsonl into curves.png when it stops."""
        c = self.config
        end = c.train.steps if num_steps is None else min(c.train.steps, int(self.state.step) + num_steps)
        start = int(self.state.step)
        if start == 0:
            self.metrics.write(0, self.evaluate(grid_name="step_000000.png"))
        bar = tqdm(range(start, end), initial=start, total=c.train.steps, desc=f"{c.method} training",
                   disable=not self.is_main)
        for _ in bar:
            metrics = self.train_step()
            step = int(self.state.step)
            if step % c.eval_every == 0 or step == c.train.steps:
                metrics.update(self.evaluate(grid_name=f"step_{step:06d}.png" if step == c.train.steps else None))
            self.metrics.write(step, metrics)
            bar.set_postfix(reward=f"{float(metrics['reward/mean']):.3f}",
                            **({"eval_acc": f"{metrics['eval/accuracy']:.3f}"} if "eval/accuracy" in metrics else {}))
            if step % c.checkpoint_every == 0 or step == end:
                self.checkpoints.save(step, args=ocp.args.StandardSave(self.state))
        self.checkpoints.wait_until_finished()
        if self.is_main and self.metrics.path.exists():
            plots.plot_metrics(self.metrics.path, self.workdir / "curves.png", title=f"{c.method} ({c.sample.kind})")

    def _restore(self) -> int | None:
        """Loads the latest checkpoint, if any; returns its step."""
        latest = self.checkpoints.latest_step()
        if latest is None:
            return None
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state)
        self.state = self.checkpoints.restore(latest, args=ocp.args.StandardRestore(abstract))
        return latest

    def close(self):
        self.checkpoints.wait_until_finished()
        self.checkpoints.close()
        self.metrics.close()
