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
import json
import logging
import shutil
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
from flowjax import sharding as sharding_lib
from flowjax.data.sampler import KRepeatSampler
from flowjax.models import lora
from flowjax.models.prediction import check_prediction, to_velocity
from flowjax.rl import advantages as adv_lib
from flowjax.rl.ema import eval_ema_step
from flowjax.rl.method import Cond, Context, build_method, velocity
from flowjax.rl.rollout_store import RolloutStore
from flowjax.worlds import check_world

log = logging.getLogger(__name__)


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


LR_SCHEDULES = ("constant", "cosine")
ADV_STD = ("global", "per_prompt")


def learning_rate(train):
    """`train.lr`, constant (the references) or, with `train.lr_schedule="cosine"`, decayed to 0 over the
    run's optimizer updates (steps x minibatches / grad_accum): a short run then ends where its
    updates are small instead of mid-stride."""
    kind = train.get("lr_schedule", "constant")
    if kind == "constant":
        return train.lr
    updates = max(1, train.steps * train.minibatches // train.grad_accum)
    return optax.cosine_decay_schedule(train.lr, updates)


def validate(config):
    """Refuses impossible or contradictory configs with a message naming the fix; returns the method."""
    t = config.train
    method = build_method(config)
    if t.get("lr_schedule", "constant") not in LR_SCHEDULES:
        raise ValueError(f"train.lr_schedule must be one of {LR_SCHEDULES}, got {t.lr_schedule!r}")
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


def minibatch_layout(rows: int, minibatches: int, devices: int, micro: int = 0) -> tuple[int, int, int]:
    """(rows per minibatch, padded rows per minibatch, gradient calls per minibatch). A minibatch is padded with
    rows of weight 0 to a multiple of the data-parallel devices (of devices x `micro` rows with
    `train.micro_batch`), so the published minibatch sizes run on any mesh with the weighted means of their
    real rows; the padding is under one row per device (per call)."""
    size = rows // minibatches
    unit = devices * micro if micro and micro * devices < size else devices
    padded = -(-size // unit) * unit
    return size, padded, padded // unit if unit > devices else 1


def accumulate_window(acc, grads, finite, every: int):
    """One minibatch into a gradient-accumulation window of `every` minibatches.

    acc = (sum of finite gradients, number of finite minibatches, minibatches seen) of the open window.
    Returns (new acc, do_step, mean): at the window's last minibatch `do_step` is True when at least one
    minibatch was finite, `mean` the mean of the finite ones (a non-finite minibatch is left out, not
    averaged in as 0), and the window closes (acc back to zeros) whether or not it steps. So windows are
    always `every` minibatches long and, with minibatches % every == 0, never cross an epoch.
    """
    g_sum, count, seen = acc
    g_sum = jax.tree.map(lambda a, g: a + jnp.where(finite, g, 0.0).astype(a.dtype), g_sum, grads)
    count, seen = count + jnp.asarray(finite, jnp.int32), seen + 1
    boundary = seen == every
    mean = jax.tree.map(lambda g: g / jnp.maximum(count, 1).astype(g.dtype), g_sum)
    reset = lambda x: jnp.where(boundary, jnp.zeros_like(x), x)
    return (jax.tree.map(reset, g_sum), reset(count), reset(seen)), boundary & (count > 0), mean


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
        # A minibatch is padded with rows of weight 0 to a multiple of the devices (x train.micro_batch): the
        # published minibatch sizes run on any mesh, and its weighted means are those of the real rows.
        train_micro = int(t.get("micro_batch", 0) or 0)
        if train_micro < 0:
            raise ValueError(f"train.micro_batch must be >= 0 (rows per device per gradient call), got {train_micro}")
        _, self.minibatch_rows, self.train_calls = minibatch_layout(self.method.rows(self.batch_size), t.minibatches,
                                                                     dp, train_micro)
        # sample.shift: SD3's shift, or "dynamic" for the world's own schedule (FLUX's resolution shift)
        shift = world.sigmas if s.shift == "dynamic" else float(s.shift)
        self.sigmas = self.method.schedule(s.num_steps, shift)
        self.rollout_sigmas = self.method.rollout_sigmas(s.num_steps, shift)
        self.eval_sigmas = shift(s.eval_num_steps) if callable(shift) else sampling.sigmas(s.eval_num_steps, shift)
        self.ema_spec = self.method.eval_ema()
        self.nfes = self.method.nfes(self.batch_size)
        # Offline methods train on a fixed dataset sampled once (Method.offline_batches): no rollout per epoch;
        # the dataset's cost is logged once, as nfe/dataset, at the epoch that samples it.
        self.offline_batches = self.method.offline_batches()
        self._stored = None
        if self.offline_batches:
            self.dataset_nfes_per_batch = self.nfes["rollout"]
            self.nfes = {**self.nfes, "rollout": 0}
        self.compute_dtype = {"float32": np.float32, "bfloat16": jnp.bfloat16}[config.get("dtype", "float32")]
        micro = int(s.get("micro_batch", 0) or 0)
        self.micro_rows = micro * dp if micro and micro * dp < self.batch_size else 0
        if micro < 0 or (self.micro_rows and self.batch_size % self.micro_rows):
            sizes = [d for d in range(1, self.batch_size // dp + 1) if (self.batch_size // dp) % d == 0]
            raise ValueError(f"sample.micro_batch={micro} rows per device must divide the batch's "
                             f"{self.batch_size // dp} rows per device (over {dp} devices); choose one of {sizes}, "
                             "or 0 for the whole batch in one call")
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
        place = self._placed if abstract else sharding_lib.shard_state
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
        self.optimizer = optax.chain(
            optax.clip_by_global_norm(t.max_grad_norm),
            optax.adamw(learning_rate(t), b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps, weight_decay=t.weight_decay),
        )
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(("data", "fsdp")))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        if abstract:
            self.state = self._abstract_state(params)
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
        self.metrics = MetricsWriter(self.workdir / "metrics.jsonl", self._restore(), self.is_main,
                                     tensorboard=config.get("tensorboard", True))

    # ------------------------------------------------------------------ abstract mode (flowjax.plan)

    @staticmethod
    def _placed(state, mesh, rules):
        """An abstract NNX state with each leaf a ShapeDtypeStruct carrying its NamedSharding."""
        shardings = sharding_lib.variable_shardings(state, mesh, rules)
        return jax.tree.map(lambda v, sh: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh), state, shardings)

    def _abstract_state(self, params) -> TrainState:
        """The TrainState's shapes and shardings: optimizer state as the compiler places it for these params,
        the method's policies and the EMA copy like the params, counters and key replicated."""
        sharded_like_params = lambda tree: jax.tree.map(
            lambda x, p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=p.sharding), tree, params)
        init = jax.jit(self.optimizer.init).lower(params).compile()
        on_mesh = lambda sh: sh if set(sh.device_set) == set(self.mesh.devices.flat) else self.replicated
        opt_state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_mesh(sh)),
                                 jax.eval_shape(self.optimizer.init, params), init.output_shardings)
        method_state = jax.eval_shape(self.method.init_state, params)
        method_state = jax.tree.map(lambda sub: sharded_like_params(sub), method_state,
                                    is_leaf=lambda x: jax.tree.structure(x) == jax.tree.structure(params))
        scalar = lambda dtype, shape=(): jax.ShapeDtypeStruct(shape, dtype, sharding=self.replicated)
        return TrainState(step=scalar(jnp.int32), opt_step=scalar(jnp.int32), params=params, opt_state=opt_state,
                          method=method_state, ema=params if self.ema_spec else None,
                          key=scalar(jnp.uint32, (2,)), nan_steps=scalar(jnp.int32))

    def programs(self, micro_rows: int | None = None, minibatch_rows: int | None = None) -> dict:
        """The trainer's programs lowered for abstract arguments (one call each, as `train_step` and
        `evaluate` make them): {"rollout", "reward", "update", "evaluate"} -> `jax.stages.Lowered`.
        `micro_rows` rows per rollout / reward / evaluation call (default: the config's), `minibatch_rows`
        rows per update call (default: the config's padded minibatch)."""
        rows = micro_rows or self.micro_rows or self.batch_size
        batch = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_sharding)
        rep = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=self.replicated)
        ctx_shape, pooled_shape = self.world.cond_shapes
        cond = lambda n: Cond(batch((n, *ctx_shape), self.compute_dtype), batch((n, *pooled_shape), self.compute_dtype),
                              rep(ctx_shape, self.compute_dtype), rep(pooled_shape, self.compute_dtype))
        ids, key = batch((rows,), jnp.int32), rep((2,), jnp.uint32)
        window = jax.eval_shape(lambda: self.method.window(0, jax.random.PRNGKey(0)))
        window = rep(window.shape, window.dtype)
        sampler = self.method.rollout_spec().sampler
        sample_params = self.state.params if sampler == "policy" else self.state.method[sampler]
        args = {"rollout": (sample_params, self.frozen, cond(rows), ids, ids, key, key, window)}
        keep, samples = jax.eval_shape(self._rollout, *args["rollout"])
        keep.pop("source", None)
        world_state = getattr(self.world, "state", None)
        args["reward"] = (batch(samples.shape, samples.dtype), batch((samples.shape[0],), jnp.int32), world_state)
        m = minibatch_rows or self.minibatch_rows
        mb = {k: batch((m, *v.shape[1:]), v.dtype) for k, v in keep.items()}
        scores = jax.eval_shape(self._score, *args["reward"])
        adv = jax.eval_shape(self._advantages, scores, batch((samples.shape[0],), jnp.int32), keep)[0]
        mb.update(cond=cond(m), advantages=batch((m, *adv.shape[1:]), adv.dtype), weights=batch((m,), jnp.float32),
                  pos=batch((m,), jnp.int32))
        acc = (self.state.params, rep((), jnp.int32), rep((), jnp.int32))
        args["update"] = (self.state, acc, self.frozen, self.ref_params, mb, window, key)
        args["evaluate"] = (self.state.params, self.frozen, cond(rows), ids, key)
        self._program_args = args
        programs = {"rollout": self._rollout, "reward": self._score, "update": self._update, "evaluate": self._evaluate}
        return {name: programs[name].lower(*a) for name, a in args.items()}

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
        def rollout(params, frozen, cond, noise_ids, rows, k_noise, key, window):
            v = lambda x, sig: velocity(apply_with(frozen), params, x, sig, cond, spec.guidance,
                                        spec.integer_timesteps)
            return method.rollout(v, draw_noise(k_noise, noise_ids), self.rollout_sigmas, key, window, rows)

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

        dp, n_micro = self._dp(), self.train_calls
        spread = NamedSharding(self.mesh, PartitionSpec(None, ("data", "fsdp")))

        def minibatch_grads(ctx, params, method_state, mb, window, key):
            """The method's gradient of a minibatch, in `train.micro_batch` calls when set: each call takes
            its rows from every device alike, and the calls' weighted means combine into the minibatch's."""
            if n_micro == 1:
                return method.grads(ctx, params, method_state, mb, window, key)
            cond = mb["cond"]
            split = lambda x: jax.lax.with_sharding_constraint(
                x.reshape(dp, n_micro, -1, *x.shape[1:]).swapaxes(0, 1).reshape(n_micro, -1, *x.shape[1:]), spread)
            parts = jax.tree.map(split, ({k: v for k, v in mb.items() if k != "cond"}, (cond.ctx, cond.pooled)))

            def one(part):
                rows, (ctx_, pooled) = part
                return method.grads(ctx, params, method_state,
                                    {**rows, "cond": Cond(ctx_, pooled, cond.neg_ctx, cond.neg_pooled)}, window, key)

            def body(carry, part):
                grads, metrics = one(part)
                skip = metrics.pop("skip", jnp.zeros((), bool))
                w = part[0]["weights"].sum()
                g_acc, m_acc, w_acc, s_acc = carry
                add = lambda a, b: a + w * b.astype(a.dtype)
                return (jax.tree.map(add, g_acc, grads), jax.tree.map(add, m_acc, metrics), w_acc + w,
                        s_acc & skip), None

            shapes = jax.eval_shape(one, jax.tree.map(lambda x: x[0], parts))[1]
            shapes.pop("skip", None)
            zeros = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)
            init = (jax.tree.map(jnp.zeros_like, params), zeros(shapes), jnp.zeros(()), jnp.ones((), bool))
            (grads, metrics, w, skip), _ = jax.lax.scan(body, init, parts)
            w = jnp.maximum(w, 1e-12)
            return jax.tree.map(lambda g: g / w.astype(g.dtype), grads), {
                **jax.tree.map(lambda m: m / w, metrics), "skip": skip}

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

        eval_world = self.eval_world

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
        """A global array sharded over the batch axis from this process's rows of the global batch."""
        n = jax.process_count()
        rows = host_array.shape[0] // n
        local = host_array[jax.process_index() * rows:(jax.process_index() + 1) * rows]
        return jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(local), host_array.shape)

    def _cond(self, prompt_ids, world=None) -> Cond:
        """Conditioning of a global batch of prompts: each process encodes only its own rows, in the model's
        compute dtype; the negative prompt's embedding is kept once, replicated, and broadcast on device."""
        world = world or self.world
        ids = np.asarray(prompt_ids)
        n, p = len(ids), jax.process_count()
        local = ids[jax.process_index() * (n // p):(jax.process_index() + 1) * (n // p)]
        ctx, pooled = world.encode(local)
        neg_ctx, neg_pooled = world.negative(1)
        dtype = self.compute_dtype
        glob = lambda a: jax.make_array_from_process_local_data(
            self.batch_sharding, np.asarray(a).astype(dtype), (n, *np.shape(a)[1:]))
        once = lambda a: jax.device_put(np.asarray(a)[0].astype(dtype), self.replicated)
        return Cond(glob(ctx), glob(pooled), once(neg_ctx), once(neg_pooled))

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

    @property
    def eval_world(self):
        """Where evaluation prompts come from: the world's held-out split when it has one."""
        return getattr(self.world, "eval_world", None) or self.world

    def eval_prompt_ids(self) -> tuple[np.ndarray, int]:
        """The fixed evaluation batch: the first `num_eval_prompts` prompts (0 = all), each
        `eval_samples_per_prompt` times, padded by repetition to a multiple of the devices (of the
        micro-batch, with `sample.micro_batch`); and the number of real (unpadded) rows, the only ones scored."""
        s, world = self.config.sample, self.eval_world
        n = world.num_prompts if not s.num_eval_prompts else min(s.num_eval_prompts, world.num_prompts)
        ids = np.repeat(np.arange(n), s.get("eval_samples_per_prompt", 1))
        unit = self.micro_rows or self._dp()
        return np.resize(ids, -(-len(ids) // unit) * unit), len(ids)

    def evaluate(self, grid_name: str | None = None) -> dict:
        """ODE samples of the evaluation prompts from fixed noise, for the policy (`eval/...`) and, when the
        method keeps one, its EMA copy (`eval_ema/...`): mean reward and strict accuracy (per task too
        when the world names tasks), and a captioned grid of the policy's samples under samples/ if asked."""
        out = self._evaluate_params(self.state.params, "eval", grid_name)
        if self.state.ema is not None:
            out.update(self._evaluate_params(self.state.ema, "eval_ema", None))
        return out

    def _evaluate_params(self, params, prefix: str, grid_name: str | None) -> dict:
        ids, n = self.eval_prompt_ids()
        world = self.eval_world
        k_noise, samples, scores = jax.random.PRNGKey(10_000 + self.config.seed), [], []
        for rows in self._micro_batches(len(ids)):
            samples.append(self._evaluate(params, self.frozen, self._cond(ids[rows], world),
                                          self._global(rows.astype(np.int32)), k_noise))
            scores.append(jax.device_get(self._eval_scores(samples[-1], self._global(ids[rows].astype(np.int32)),
                                                           getattr(world, "state", None))))
        samples = samples[0]  # the grid shows the first micro-batch's samples
        scores = {k: np.concatenate([sc[k] for sc in scores]) for k in scores[0]}
        out = {f"{prefix}/{k}_mean" if k == "reward" else f"{prefix}/{k}": float(np.nanmean(v[:n]))
               for k, v in scores.items()}
        if "accuracy" in scores and hasattr(world, "task_names"):
            tasks = np.asarray(world.task_names(ids[:n]))
            for task in dict.fromkeys(tasks):
                out[f"{prefix}/accuracy_{task}"] = float(np.mean(scores["accuracy"][:n][tasks == task]))
        if grid_name and hasattr(world, "images"):
            g = min(self.config.get("grid_size", 32), len(samples))
            # Every process joins the replicated gather (multi-host); only process 0 draws.
            to_images = jax.jit(lambda x: world.images(x[:g]), out_shardings=self.replicated)
            images = np.asarray(jax.device_get(to_images(samples)))
            if self.is_main:
                correct = scores["accuracy"][:g] if "accuracy" in scores else None
                title = f"step {int(self.state.step)}" + (
                    f": accuracy {out[f'{prefix}/accuracy']:.2f}" if f"{prefix}/accuracy" in out else "")
                plots.save_grid(images, world.captions(ids[:g]), self.workdir / "samples" / grid_name,
                                correct=correct, title=title)
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
            dataset_metrics = self._prepare_stored_rollouts()
            prompt_ids, group_ids, keep, scores = self._stored.epoch(step)
            source = np.arange(len(prompt_ids))
            conds = [self._cond(prompt_ids[rows]) for rows in self._micro_batches(len(prompt_ids))]
            cond = Cond(*self._concat([(cd.ctx, cd.pooled) for cd in conds]), conds[0].neg_ctx, conds[0].neg_pooled)
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
                                          self._global(rows.astype(np.int32)), k_noise, k_sample, window)
            # Scored rows: the micro-batch's, or the method's own (keep["source"]: each one's row in the call).
            local = np.asarray(jax.device_get(keep.pop("source"))) if "source" in keep else np.arange(len(rows))
            scores.append(self._score(samples, self._global(prompt_ids[rows[local]].astype(np.int32)), world_state))
            conds.append(cond)
            keeps.append(keep)
            sources.append(rows[local])
        cond = Cond(*self._concat([(cd.ctx, cd.pooled) for cd in conds]), conds[0].neg_ctx, conds[0].neg_pooled)
        return cond, self._concat(keeps), self._concat(scores), np.concatenate(sources)

    def _prepare_stored_rollouts(self) -> dict:
        """Offline methods (`Method.offline_batches`): samples the fixed dataset's missing batches with the
        REFERENCE policy (the method's rollout of the batches of epochs 0..n-1, from the keys an online run would
        use for them, in `sample.micro_batch` calls like any rollout: per-row noise makes the dataset independent
        of the micro-batching), scores them and writes them to WORKDIR/rollouts/ (process 0; a shared filesystem
        on several hosts), then loads the dataset once. Batches already there (a resumed run, or one killed while
        sampling) are not sampled again. Returns the one-time cost to log (nfe/dataset, time/dataset_s,
        images/sampled; 0 images once the dataset is there)."""
        if self._stored is not None:
            return {"images/sampled": 0}
        t = self.config.train
        spec = self.method.rollout_spec()
        store = RolloutStore(self.workdir / "rollouts", dict(
            num_batches=self.offline_batches, prompts_per_batch=t.prompts_per_batch, group_size=t.group_size,
            seed=int(self.config.seed), num_prompts=int(self.world.num_prompts), method=self.config.method,
            rollout=repr(spec), num_steps=int(self.config.sample.num_steps),
            latent_shape=[*self.config.sample.latent_size, int(self.world.channels)],
            # recorded only when set, so that datasets sampled before it was recorded still match
            **({"same_noise_per_group": True} if self.config.sample.get("same_noise_per_group") else {})))
        if self.is_main:
            store.check_meta()
        todo = np.asarray(store.missing(), np.int32)
        if jax.process_count() > 1:  # every process must join the same rollouts: take process 0's view
            from jax.experimental import multihost_utils

            flags = np.zeros(self.offline_batches, np.int32)
            flags[todo] = 1
            todo = np.flatnonzero(multihost_utils.broadcast_one_to_all(flags)).astype(np.int32)
        t0 = time.perf_counter()
        for i in todo:
            i = int(i)
            prompt_ids, group_ids = self.sampler.batch(i)
            k_noise, k_sample, k_window, _, _ = jax.random.split(jax.random.fold_in(self.state.key, i), 5)
            window = self.method.window(i, k_window)
            _, keep, scores, source = self._sample_batch(self.ref_params, prompt_ids, group_ids, k_noise, k_sample,
                                                         window)
            if len(source) != len(prompt_ids) or np.any(source != np.arange(len(prompt_ids))):
                raise ValueError(f"{self.config.method}: offline datasets keep one row per batch row; a rollout "
                                 "that scores its own rows (keep['source']) cannot be stored")
            keep, scores = jax.device_get(self._replicate((keep, scores)))
            if self.is_main:
                store.write(i, prompt_ids, group_ids, keep, scores)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("flowjax rollout dataset written")
        self._stored = store.load()
        if not len(todo):
            return {"images/sampled": 0}
        return {"nfe/dataset": len(todo) * self.dataset_nfes_per_batch, "time/dataset_s": time.perf_counter() - t0,
                "images/sampled": len(todo) * self.batch_size}

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

    def _restore(self) -> int | None:
        """Loads the newest readable checkpoint, if any; returns its step.

        A checkpoint that cannot be read (a save cut short, a damaged file) is logged with the reason, moved
        aside to WORKDIR/damaged_checkpoints/ (never deleted), and the next newest is tried; the run then
        continues exactly as an uninterrupted one would (an epoch's data is a function of (seed, epoch)).
        When checkpoints exist and none is readable, the run stops with a message naming the folder.
        """
        steps = sorted(self.checkpoints.all_steps(), reverse=True)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state)
        for step in steps:
            try:
                self.state = self.checkpoints.restore(step, args=ocp.args.StandardRestore(abstract))
                return step
            except Exception as e:  # noqa: BLE001 - any failure to read it makes the checkpoint unusable
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
                aside = self.workdir / "damaged_checkpoints" / f"{step}-{int(time.time())}"
                log.warning("checkpoint %d in %s cannot be read (%s); moved to %s", step,
                            self.workdir / "checkpoints", reason, aside)
                if self.is_main:
                    aside.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(self.workdir / "checkpoints" / str(step)), aside)
                    with (self.workdir / "damaged_checkpoints" / "log.txt").open("a") as f:
                        f.write(f"step {step}: {reason}\n")
                self.checkpoints.reload()
        if steps:
            raise RuntimeError(f"no checkpoint in {self.workdir / 'checkpoints'} can be read (steps {steps} were moved "
                               f"to {self.workdir / 'damaged_checkpoints'}, see its log.txt); move them back or start "
                               "a fresh workdir")
        return None

    def close(self):
        self.checkpoints.wait_until_finished()
        self.checkpoints.close()
        self.metrics.close()
