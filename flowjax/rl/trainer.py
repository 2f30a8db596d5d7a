"""The online RL loop: sample -> reward -> advantages -> jitted updates, sharded over a mesh.

One `Trainer` serves every method: `config.method` names a plugin (`flowjax.rl.method`), and the trainer
only calls its hooks. The trainable parameters (LoRA adapters, or all params for full fine-tuning), the
optimizer state, the method's own state (old / EMA policies), the EMA evaluation copy and the RNG live in
one `TrainState` pytree that orbax checkpoints at epoch ends; the batch of an epoch is a pure function of
(seed, epoch), so a resumed run continues exactly.

An epoch (the references' "epoch": one batch of rollouts, then `train.minibatches` updates on it):
  rollout (the method's sampler spec) -> world scores -> method.advantages -> method.plan (row order and
  weights of the minibatches) -> per minibatch method.grads + gradient accumulation over
  `train.grad_accum` minibatches -> method.end_of_epoch.
Gradient accumulation windows never cross an epoch (minibatches % grad_accum == 0), and a minibatch whose
loss or gradient is not finite is left out of its window's mean (counted in `nan_steps`); a window with no
finite minibatch makes no optimizer step.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from flowjax import checkpoint, plots, sampling
from flowjax.metrics import MetricsWriter
from flowjax import sharding as sharding_lib
from flowjax.data.sampler import KRepeatSampler
from flowjax.models import lora
from flowjax.models.prediction import check_prediction, to_velocity
from flowjax.rl import abstract as abstract_lib
from flowjax.rl import advantages as adv_lib
from flowjax.rl import evaluation, feed, optim
from flowjax.rl.batching import accumulate_window, micro_batched, minibatch_layout, sample_micro_rows
from flowjax.rl.ema import eval_ema_step
from flowjax.rl.method import Cond, Context, build_method, velocity
from flowjax.rl.rollout_store import sample_dataset
from flowjax.worlds import check_world

@struct.dataclass
class TrainState:
    step: jax.Array  # epochs done
    opt_step: jax.Array  # optimizer steps done (the references' global_step)
    params: Any  # the trainable state (nnx.State)
    opt_state: Any
    method: Any  # the method's own state (old policy, KL-EMA policy, ...)
    ema: Any  # the EMA evaluation copy of params (None when the method keeps none)
    key: jax.Array  # raw uint32 PRNG key (checkpointable)
    nan_steps: jax.Array


ADV_STD = ("global", "per_prompt")


def validate(config):
    """Refuses impossible or contradictory configs with a message naming the fix; returns the method."""
    t = config.train
    method = build_method(config)
    optim.check(t)
    a = config.get("advantage") or {}
    if a.get("std", "global") not in ADV_STD:
        raise ValueError(f"advantage.std must be one of {ADV_STD}, got {a.get('std')!r}")
    batch = t.prompts_per_batch * t.group_size
    rows = method.rows(batch)
    if rows % t.minibatches:
        what = f"the batch ({t.prompts_per_batch} prompts x {t.group_size}) = {batch}" + (
            f" ({rows} trained rows)" if rows != batch else "")
        raise ValueError(f"{what} is not divisible by train.minibatches={t.minibatches}")
    if t.grad_accum < 1 or t.minibatches % t.grad_accum:
        raise ValueError(f"train.minibatches={t.minibatches} must be a multiple of train.grad_accum={t.grad_accum} "
                         "(an accumulation window never crosses an epoch)")
    method.validate()
    return method


def world_scores(world, samples, prompt_ids, world_state=None) -> dict:
    """Per-sample scores of a world: {"reward": [B], ...} (strict accuracy, reward components), with its
    weights (VAE, reward models) passed in as `world_state` so they are jit arguments, not constants."""
    return dict(world.score(samples, prompt_ids, state=world_state))


class Trainer:
    """Wires model, world (conditioning + reward), method, optimizer, mesh and checkpoints from a config.

    `prediction` says what the model outputs ("velocity" as SD3.5, or "sample": the clean image, as
    the shapes base model); samplers and losses always see the velocity (flowjax.models.prediction).
    `base` is the diffusers transformer folder the frozen weights came from, recorded in WORKDIR/policy so
    that `python -m flowjax.convert export-lora WORKDIR` can rebuild the trained model (None: the model's
    weights are saved there instead, for small randomly initialised models).

    `abstract=True` builds the same programs from shapes alone, for ahead-of-time compilation on any mesh
    (`flowjax.plan`): `model` is then a function that builds the model (run under `nnx.eval_shape`, nothing
    is allocated), every state is a `jax.ShapeDtypeStruct` with its sharding, and no workdir is touched.
    """

    def __init__(self, config, workdir, *, model, world, mesh=None, prediction: str = "velocity",
                 base=None, abstract: bool = False):
        self.method = validate(config)
        check_prediction(prediction)
        check_world(world)
        self.config, self.world, self.abstract = config, world, abstract
        self.workdir = Path(workdir).absolute() if workdir is not None else None
        if not abstract:
            self.workdir.mkdir(parents=True, exist_ok=True)
        self.mesh = mesh or sharding_lib.make_mesh(dict(config.mesh))
        self.is_main = jax.process_index() == 0
        s, t = config.sample, config.train
        self.sampler = KRepeatSampler(world.num_prompts, t.prompts_per_batch, t.group_size, seed=config.seed)
        self.batch_size = self.sampler.batch_size
        dp = self._dp()
        if self.batch_size % dp:
            raise ValueError(f"the batch of {self.batch_size} rollouts must divide evenly over the {dp} data-parallel "
                             f"devices of the mesh; change train.prompts_per_batch or train.group_size, or the mesh")
        # A minibatch is padded with rows of weight 0 to a multiple of the devices (x its gradient calls): the
        # published minibatch sizes run on any mesh, and its weighted means are those of the real rows.
        train_micro = int(t.get("micro_batch", 0) or 0)
        if train_micro < 0:
            raise ValueError(f"train.micro_batch must be >= 0 (rows per device per gradient call), got {train_micro}")
        _, self.minibatch_rows, self.train_calls = minibatch_layout(
            self.method.rows(self.batch_size), t.minibatches, dp, train_micro, self.method.train_micro_unit())
        # sample.shift: SD3's shift, or "dynamic" for the world's own schedule (FLUX's resolution shift)
        shift = world.sigmas if s.shift == "dynamic" else float(s.shift)
        self.sigmas = self.method.schedule(s.num_steps, shift)
        self.rollout_sigmas = self.method.rollout_sigmas(s.num_steps, shift)
        self.eval_sigmas = shift(s.eval_num_steps) if callable(shift) else sampling.sigmas(s.eval_num_steps, shift)
        self.ema_spec = self.method.eval_ema()
        self.guide_state = self.method.guide_state(world)  # None unless the method guides its rollouts
        self.nfes = self.method.nfes(self.batch_size)
        # Offline methods train on a fixed dataset sampled once (Method.offline_batches): no rollout per epoch;
        # the dataset's cost is logged once, as nfe/dataset, at the epoch that samples it.
        self.offline_batches = self.method.offline_batches()
        self._stored = None
        if self.offline_batches:
            self.dataset_nfes_per_batch = self.nfes["rollout"]
            self.nfes = {**self.nfes, "rollout": 0}
        self.compute_dtype = {"float32": np.float32, "bfloat16": jnp.bfloat16}[config.get("dtype", "float32")]
        self.micro_rows = sample_micro_rows(self.batch_size, dp, int(s.get("micro_batch", 0) or 0))
        # Trainable vs frozen; the reference policy is LoRA off (zero adapters) or the initial weights.
        def adapt(m):
            if config.lora.rank > 0:
                lora.apply(m, lora.LoRAConfig(config.lora.rank, config.lora.alpha, tuple(config.lora.targets)),
                           rngs=nnx.Rngs(config.seed))
            return m

        trainable = nnx.LoRAParam if config.lora.rank > 0 else nnx.Param
        model = nnx.eval_shape(lambda: adapt(model())) if abstract else adapt(model)
        if not abstract:  # every process: the base weights' save is collective
            checkpoint.save_policy(self.workdir, model, base=base, trainable="lora" if config.lora.rank > 0 else "all")
        graphdef, params, frozen = nnx.split(model, trainable, ...)
        rules = tuple(config.sharding_rules)
        place = abstract_lib.placed if abstract else sharding_lib.shard_state
        params = place(params, self.mesh, rules)
        self.frozen = place(frozen, self.mesh, rules)
        self.ref_params = (params if abstract else lora.disabled(params)) if config.lora.rank > 0 else params
        self.graphdef = graphdef

        guidance = getattr(world, "model_guidance", None)  # FLUX.1-dev's embedded guidance, an input of the model

        def apply(p, x, timesteps, ctx, pooled, *, frozen):
            extra = {} if guidance is None else {"guidance": jnp.full(timesteps.shape, guidance, jnp.float32)}
            out = nnx.merge(graphdef, p, frozen)(x, timesteps, ctx, pooled, **extra)
            return to_velocity(out, x, timesteps / 1000.0, prediction)

        self.apply = apply
        self.optimizer = optim.optimizer(t)
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(("data", "fsdp")))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        if abstract:
            self.state = abstract_lib.abstract_state(self, params)
            self._build_jitted()
            return
        copy = lambda tree: jax.tree.map(jnp.copy, tree)
        zero = jnp.zeros((), jnp.int32)
        self.state = TrainState(
            step=zero, opt_step=zero, params=params, opt_state=self.optimizer.init(params),
            method=copy(self.method.init_state(params)), ema=copy(params) if self.ema_spec else None,
            key=jax.random.PRNGKey(config.seed), nan_steps=zero,
        )
        self._build_jitted()

        self.checkpoints = ocp.CheckpointManager(
            self.workdir / "checkpoints",
            options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, enable_async_checkpointing=True),
        )
        self.state, restored = checkpoint.restore_newest(self.checkpoints, self.state, self.workdir, self.is_main)
        self.metrics = MetricsWriter(self.workdir / "metrics.jsonl", restored, self.is_main,
                                     tensorboard=config.get("tensorboard", True))

    # ------------------------------------------------------------------ jitted functions

    def _build_jitted(self):
        method, spec, s, t = self.method, self.method.rollout_spec(), self.config.sample, self.config.train
        sigmas, ema_spec = self.sigmas, self.ema_spec

        def apply_with(frozen):
            return lambda p, *a: self.apply(p, *a, frozen=frozen)


        noise_shape = (*s.latent_size, self.world.channels)

        def draw_noise(key, ids):
            """Initial noise of rows `ids`, a pure function of (key, row id): any micro-batching draws the same."""
            return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), noise_shape, jnp.float32))(ids)

        @jax.jit
        def rollout(params, frozen, cond, noise_ids, rows, k_noise, key, window, prompt_ids, guide_state):
            v = lambda x, sig: velocity(apply_with(frozen), params, x, sig, cond, spec.guidance,
                                        spec.integer_timesteps)
            guide = method.guide(guide_state, self.world, cond, prompt_ids)
            return method.rollout(v, draw_noise(k_noise, noise_ids), self.rollout_sigmas, key, window, rows,
                                  **({} if guide is None else {"guide": guide}))

        @jax.jit
        def evaluate(params, frozen, cond, rows, k_noise):
            v = lambda x, sig: velocity(apply_with(frozen), params, x, sig, cond, float(s.eval_guidance))
            return sampling.rollout(v, draw_noise(k_noise, rows), self.eval_sigmas, kind="ode").latents[-1]

        @jax.jit
        def score(samples, prompt_ids, world_state):
            """The world's per-sample scores of one micro-batch ({"reward": [R], ...})."""
            return world_scores(self.world, samples, prompt_ids, world_state)

        @jax.jit
        def advantages(scores, group_ids, keep):
            """Rewards of the whole batch -> the method's advantages, and the reward statistics to log."""
            scores = dict(scores)
            rewards = scores.pop("reward")
            adv = method.advantages(rewards, group_ids, t.prompts_per_batch, keep)
            stats = adv_lib.group_reward_stats(rewards, group_ids, num_groups=t.prompts_per_batch)
            return adv, {"reward/mean": rewards.mean(), "reward/std": rewards.std(),
                         **{f"reward/{k}": jnp.nanmean(v) for k, v in scores.items()},
                         **{f"group/{k}": v for k, v in stats.items()}}

        @functools.partial(jax.jit, out_shardings=self.replicated)  # every process reads the same plan
        def plan(advantages, key):
            return method.plan(advantages, key, t.minibatches)

        def ema_step(ema, params, opt_step, due=True):
            return jax.lax.cond(due, lambda: eval_ema_step(ema, params, ema_spec, opt_step), lambda: ema)

        minibatch_grads = micro_batched(method.grads, self._dp(), self.train_calls,
                                        NamedSharding(self.mesh, PartitionSpec(None, ("data", "fsdp"))))

        @jax.jit
        def update(state: TrainState, acc, frozen, ref_params, mb, window, key):
            ctx = Context(apply_with(frozen), ref_params, sigmas)
            grads, metrics = minibatch_grads(ctx, state.params, state.method, mb, window, key)
            # NaN guard: a non-finite loss or gradient is left out of its accumulation window's mean. A method
            # may also report `skip` (nothing to train in this minibatch, e.g. an empty MixGRPO window).
            skip = metrics.pop("skip", jnp.zeros((), bool))
            finite = jnp.isfinite(metrics["loss"]) & jnp.all(
                jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
            acc, do_step, mean = accumulate_window(acc, grads, finite & ~skip, t.grad_accum)

            def step(_):
                updates, opt_state = self.optimizer.update(mean, state.opt_state, state.params)
                return optax.apply_updates(state.params, updates), opt_state

            params, opt_state = jax.lax.cond(do_step, step, lambda _: (state.params, state.opt_state), None)
            opt_step = state.opt_step + do_step.astype(jnp.int32)
            ema = state.ema
            if ema_spec is not None and ema_spec.cadence == "microbatch":
                ema = ema_step(ema, params, opt_step)
            elif ema_spec is not None and ema_spec.cadence == "update":
                ema = ema_step(ema, params, opt_step, do_step)
            metrics["grad_norm"] = optax.global_norm(grads)
            state = state.replace(params=params, opt_state=opt_state, opt_step=opt_step, ema=ema,
                                  nan_steps=state.nan_steps + (~finite).astype(jnp.int32))
            return state, acc, metrics

        @jax.jit
        def end_of_epoch(state: TrainState):
            """The method's state updates after the epoch's optimizer steps (old / KL-EMA policies)."""
            method_state, metrics = method.end_of_epoch(state.method, state.params, state.opt_step)
            ema = state.ema
            if ema_spec is not None and ema_spec.cadence == "epoch":
                ema = ema_step(ema, state.params, state.opt_step)
            return state.replace(method=method_state, ema=ema, step=state.step + 1), metrics

        eval_world = evaluation.eval_world(self)

        # Replicated outputs: every process reads the whole per-sample evaluation (multi-host safe).
        @functools.partial(jax.jit, out_shardings=self.replicated)
        def eval_scores(samples, prompt_ids, world_state):
            """Per-sample reward (and strict accuracy or reward components when the world has them)."""
            return world_scores(eval_world, samples, prompt_ids, world_state)

        zeros = jax.jit(lambda p: (jax.tree.map(jnp.zeros_like, p), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)))
        self._rollout, self._evaluate, self._update, self._end_of_epoch = rollout, evaluate, update, end_of_epoch
        self._score, self._advantages, self._plan, self._eval_scores = score, advantages, plan, eval_scores
        self._zero_acc = zeros
        # Offline datasets: a rollout's kept arrays and scores, replicated so that every process can store them.
        self._replicate = jax.jit(lambda tree: tree, out_shardings=self.replicated)

    # ------------------------------------------------------------------ data

    def _global(self, host_array):
        return feed.global_rows(host_array, self.batch_sharding)

    def _cond(self, prompt_ids, world=None) -> Cond:
        return feed.conditioning(world or self.world, prompt_ids, self.batch_sharding, self.replicated,
                                 self.compute_dtype)

    def _micro_batches(self, n: int) -> list[np.ndarray]:
        """Row indices of each program call over n rows: `sample.micro_batch` rows per device x the
        data-parallel devices per call (0: one call for all n)."""
        size = self.micro_rows or n
        return [np.arange(i, i + size) for i in range(0, n, size)]

    @staticmethod
    def _concat(parts):
        """Micro-batch outputs (pytrees of arrays with rows first) joined along the rows."""
        return parts[0] if len(parts) == 1 else jax.tree.map(lambda *a: jnp.concatenate(a), *parts)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, grid_name: str | None = None) -> dict:
        """ODE samples of the evaluation prompts from fixed noise, for the policy (`eval/...`) and, when the
        method keeps one, its EMA copy (`eval_ema/...`): mean reward and strict accuracy (per task too
        when the world names tasks), and a captioned grid of the policy's samples under samples/ if asked."""
        out = evaluation.evaluate_params(self, self.state.params, "eval", grid_name)
        if self.state.ema is not None:
            out.update(evaluation.evaluate_params(self, self.state.ema, "eval_ema", None))
        return out

    def _dp(self):
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    # ------------------------------------------------------------------ loop

    def train_step(self) -> dict:
        """One epoch of the references: a batch of rollouts, then `minibatches` updates on it."""
        t = self.config.train
        step = int(self.state.step)
        prompt_ids, group_ids = self.sampler.batch(step)
        key = jax.random.fold_in(self.state.key, step)
        k_noise, k_sample, k_window, k_perm, k_train = jax.random.split(key, 5)
        window = self.method.window(step, k_window)
        dataset_metrics = {}
        t0 = time.perf_counter()
        if self.offline_batches:  # offline: the epoch's rows come from the stored dataset, nothing is sampled
            dataset_metrics = {"images/sampled": 0}
            if self._stored is None:
                self._stored, dataset_metrics = sample_dataset(self)
            prompt_ids, group_ids, keep, scores = self._stored.epoch(step)
            source = np.arange(len(prompt_ids))
            cond = Cond.join([self._cond(prompt_ids[rows]) for rows in self._micro_batches(len(prompt_ids))])
            keep = {k: self._global(v) for k, v in keep.items()}
            scores = {k: self._global(v) for k, v in scores.items()}
        else:
            sampler = self.method.rollout_spec().sampler
            sample_params = self.state.params if sampler == "policy" else self.state.method[sampler]
            cond, keep, scores, source = self._sample_batch(sample_params, prompt_ids, group_ids, k_noise, k_sample,
                                                            window)
        advantages, reward_metrics = self._advantages(scores, self._global(group_ids[source].astype(np.int32)), keep)
        t_sample = time.perf_counter() - t0

        order, weights = (np.asarray(a) for a in jax.device_get(self._plan(advantages, k_perm)))
        size, padded = len(source) // t.minibatches, self.minibatch_rows  # rows of weight 0 fill the last devices
        acc, logs = self._zero_acc(self.state.params), []
        for i in range(t.minibatches):
            rows = np.resize(order[i * size:(i + 1) * size], padded)
            w = np.concatenate([weights[i * size:(i + 1) * size], np.zeros(padded - size, np.float32)])
            mb = {k: v[rows] for k, v in keep.items()}
            mb.update(cond=cond.rows(source[rows]), advantages=advantages[rows], weights=self._global(w),
                      pos=self._global(np.arange(padded, dtype=np.int32)))
            self.state, acc, m = self._update(self.state, acc, self.frozen, self.ref_params, mb, window,
                                              jax.random.fold_in(k_train, i))
            logs.append(m)
        self.state, epoch_metrics = self._end_of_epoch(self.state)
        if int(self.state.nan_steps) > t.max_nan_steps:
            raise FloatingPointError(f"{int(self.state.nan_steps)} updates had a non-finite loss or gradient "
                                     f"(train.max_nan_steps={t.max_nan_steps}); lower train.lr or check the reward")
        metrics = {k: np.mean([float(m[k]) for m in logs]) for k in logs[0]}
        metrics.update(reward_metrics)
        metrics.update({k: float(v) for k, v in epoch_metrics.items()})
        metrics.update({f"nfe/{k}": v for k, v in self.nfes.items()})
        metrics.update(dataset_metrics)
        metrics.update({"train/kept_fraction": float(weights.mean()), "train/opt_steps": int(self.state.opt_step),
                        "time/sample_s": t_sample, "time/step_s": time.perf_counter() - t0,
                        "nan_steps": self.state.nan_steps})
        return metrics

    def _sample_batch(self, params, prompt_ids, group_ids, k_noise, k_sample, window):
        """Rollouts of one batch by `params` (the method's rollout, in `sample.micro_batch` calls with per-row
        noise, so any micro-batching samples the same) and the world's scores of them: (cond, keep, scores,
        source), keep and scores over the scored rows, source [R] each scored row's batch row."""
        batch = len(prompt_ids)
        noise_ids = np.arange(batch)
        if self.config.sample.same_noise_per_group:  # a group's rows start from its first row's noise
            noise_ids = np.asarray([np.flatnonzero(group_ids == g)[0] for g in group_ids])
        world_state = getattr(self.world, "state", None)
        conds, keeps, scores, sources = [], [], [], []
        for rows in self._micro_batches(batch):
            cond = self._cond(prompt_ids[rows])
            keep, samples = self._rollout(params, self.frozen, cond,
                                          self._global(noise_ids[rows].astype(np.int32)),
                                          self._global(rows.astype(np.int32)), k_noise, k_sample, window,
                                          self._global(prompt_ids[rows].astype(np.int32)), self.guide_state)
            # Scored rows: the micro-batch's, or the method's own (keep["source"]: each one's row in the call).
            local = np.asarray(jax.device_get(keep.pop("source"))) if "source" in keep else np.arange(len(rows))
            scores.append(self._score(samples, self._global(prompt_ids[rows[local]].astype(np.int32)), world_state))
            conds.append(cond)
            keeps.append(keep)
            sources.append(rows[local])
        cond = Cond.join(conds)
        return cond, self._concat(keeps), self._concat(scores), np.concatenate(sources)

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
            plots.plot_metrics(self.metrics.path, self.workdir / "curves.png", title=f"{c.method} ({c.get('variant', '')})")

    def close(self):
        self.checkpoints.wait_until_finished()
        self.checkpoints.close()
        self.metrics.close()
