"""What a flow-RL method is to the trainer, and the registry that maps `config.method` to one.

A method is one module under `flowjax/rl/` with one `Method` subclass that owns everything
method-specific:

  defaults()        its config section, `config.<name>` (published defaults; config files override)
  validate()        refuses impossible settings with a message naming the fix
  rollout_spec()    what its rollouts need: sampler kind, noise level, CFG, solver options, and whose
                    parameters sample ("policy", or "old" for DiffusionNFT's old policy)
  schedule()        the sigma schedule its training timesteps come from (SD3's by default)
  rollout_sigmas()  the grid its rollouts run on (the schedule, unless its solver has its own)
  init_state()      its own state (old policy, KL-EMA policy, ...), checkpointed with the rest
  window()          per-epoch rollout information drawn before sampling (MixGRPO's window start)
  guide_state()     the arrays a reward-gradient guide reads (a latent PRM, the world's reward weights), built
                    once from the world; guide() turns them into the rollout's `guide` (Euphonium); None: none
  rollout()         the rollout itself: (what it keeps for training, the samples to score), row by row. By
                    default one `sampling.rollout` per batch row; a method may score more rows than the
                    batch has (TempFlow-GRPO's branches), naming each row's batch row in keep["source"]
  keep()            what the default rollout keeps for training (batch-first arrays)
  offline_batches() 0 (online: fresh rollouts by the policy every epoch), or the size in batches of a fixed
                    dataset that the trainer samples and scores once with the reference policy, keeps in
                    WORKDIR/rollouts/ and trains on instead of sampling (GDRO's offline mode)
  advantages()      rewards -> advantages ([B] or per sampler step [B, T]); group normalisation by default
  plan()            how the epoch's rows go into minibatches (and with which weights)
  grads()           the mean gradient and metrics of one minibatch (pure, jitted by the trainer)
  train_micro_unit() the rows a gradient call keeps together (train.micro_batch a multiple of it; 1 by default)
  end_of_epoch()    its state updates after the epoch's optimizer steps
  eval_ema()        its EMA evaluation copy: decay, interval and cadence, or None

The trainer (`flowjax.rl.trainer`) names no method: it builds `build_method(config)` and calls these.
Adding a method is one file with a `Method` subclass, a line in `_REGISTRY` (or `register()` from
user code) and a config variant.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flowjax import sampling
from flowjax.rl import advantages as adv_lib

CADENCES = ("microbatch", "update", "epoch")
SAMPLERS = ("policy", "old")


@dataclasses.dataclass(frozen=True)
class RolloutSpec:
    """What a method's rollouts need (hashable: the trainer jits one rollout program per spec)."""

    kind: str  # a sampling kernel (sampling.KINDS) or solver
    noise_level: float = 0.0
    guidance: float = 1.0  # classifier-free guidance scale of the rollout
    sampler: str = "policy"  # whose parameters sample: "policy", or "old" (the method state's "old" entry)
    options: tuple = ()  # extra keyword arguments of sampling.rollout, as sorted (name, value) pairs
    # The model sees floor(sigma * 1000), as references that pass integer timesteps (DiffusionNFT's
    # rollouts, DanceGRPO) do.
    integer_timesteps: bool = False

    def kwargs(self) -> dict:
        return dict(self.options)


@dataclasses.dataclass(frozen=True)
class EvalEMA:
    """An EMA copy of the trainable parameters that evaluations and exports can use.

    Follows flow_grpo `flow_grpo/ema.py` `EMAModuleWrapper` (yifan123/flow_grpo ac4c86e): at each call
    with optimizer-step counter `s`, when (s + 1) % every == 0,
    ema <- ema + (1 - d)(params - ema), d = min((1 + s) / (10 + s), decay).
    cadence says when the references call it: "microbatch" (Flow-GRPO: after every micro-batch),
    "update" (DiffusionNFT: after every optimizer step), "epoch" (AWM: once after the epoch's updates).
    """

    decay: float
    every: int = 1
    cadence: str = "update"


class Cond(NamedTuple):
    """Conditioning of a batch: text [B, L, D] and pooled [B, P] embeddings, and the negative prompt's
    [L, D] / [P] for CFG, stored once and broadcast on device."""

    ctx: jax.Array
    pooled: jax.Array
    neg_ctx: jax.Array
    neg_pooled: jax.Array

    def rows(self, idx):
        return Cond(self.ctx[idx], self.pooled[idx], self.neg_ctx, self.neg_pooled)

    @staticmethod
    def join(parts: list["Cond"]) -> "Cond":
        """Micro-batches' conditioning joined along the rows (the negative prompt is the same in each)."""
        if len(parts) == 1:
            return parts[0]
        cat = lambda *a: jnp.concatenate(a)
        return Cond(cat(*(c.ctx for c in parts)), cat(*(c.pooled for c in parts)), parts[0].neg_ctx,
                    parts[0].neg_pooled)


class Context(NamedTuple):
    """What `Method.grads` gets from the trainer besides the parameters and the minibatch."""

    apply: Callable[..., jax.Array]  # apply(params, x, timesteps (sigma * 1000), ctx, pooled) -> velocity
    ref_params: Any  # the reference policy (LoRA off, or the initial weights)
    sigmas: jax.Array  # the rollout schedule [T + 1]


class Method:
    """Base class: the defaults that most methods share. See the module docstring."""

    name: ClassVar[str]
    # The metric names `grads` returns (besides the trainer's own grad_norm); checked by the tests.
    metric_names: ClassVar[tuple[str, ...]] = ("loss",)

    def __init__(self, config):
        self.config = config
        if self.name not in config:
            raise ValueError(f"config.method={self.name!r} needs its section config.{self.name}; start from "
                             f"{type(self).__module__}.{type(self).__name__}.defaults()")
        self.cfg = config[self.name]

    # ---------------------------------------------------------------- configuration

    @staticmethod
    def defaults() -> ml_collections.ConfigDict:
        raise NotImplementedError

    def validate(self) -> None:
        """Checks shared by every method; subclasses add theirs (and call this)."""
        spec = self.rollout_spec()
        if spec.sampler not in SAMPLERS:
            raise ValueError(f"{self.name}: rollout sampler must be one of {SAMPLERS}, got {spec.sampler!r}")
        ema = self.eval_ema()
        if ema is not None:
            if ema.cadence not in CADENCES:
                raise ValueError(f"config.{self.name}.eval_ema.cadence must be one of {CADENCES}, got {ema.cadence!r}")
            if not 0.0 < ema.decay < 1.0 or ema.every < 1:
                raise ValueError(f"config.{self.name}.eval_ema needs 0 < decay < 1 (0 turns it off) and every >= 1, "
                                 f"got decay={ema.decay}, every={ema.every}")

    def eval_ema(self) -> EvalEMA | None:
        """From `config.<name>.eval_ema` (decay 0 = no EMA copy)."""
        e = self.cfg.get("eval_ema")
        if e is None or not e.decay:
            return None
        return EvalEMA(float(e.decay), int(e.every), str(e.cadence))

    # ---------------------------------------------------------------- rollouts

    def rollout_spec(self) -> RolloutSpec:
        raise NotImplementedError

    def schedule(self, num_steps: int, shift) -> jax.Array:
        """The sigma schedule [num_steps + 1] that training timesteps are taken from: SD3's shifted one, or
        `shift(num_steps)` when the world gives its own (FLUX's resolution-dependent shift)."""
        return shift(num_steps) if callable(shift) else sampling.sigmas(num_steps, shift)

    def rollout_sigmas(self, num_steps: int, shift: float) -> jax.Array:
        """The grid the rollouts run on; the training schedule unless the solver has its own."""
        return self.schedule(num_steps, shift)

    def init_state(self, params) -> Any:
        """The method's own pytree (old / EMA policies ...); None when it has none."""
        return None

    def window(self, epoch: int, key) -> jax.Array:
        """Per-epoch rollout information drawn before sampling (an int32 scalar; 0 when unused)."""
        return jnp.zeros((), jnp.int32)

    def guide_state(self, world) -> Any:
        """The arrays this method's reward-gradient guide reads (a latent PRM's weights, the world's reward
        weights), built once by the trainer from the world and passed to every rollout call as a jit argument;
        None (default) when its rollouts take no guide."""
        return None

    def guide(self, state, world, cond: Cond, prompt_ids) -> Callable | None:
        """The `guide(x, sigma [B], v) -> (scores [B], gradient)` of one rollout call (see sampling.rollout),
        from `guide_state`'s arrays and the call's conditioning and prompt ids, traced inside the rollout
        program; the trainer passes it to `rollout(..., guide=...)`. None (default): no guide."""
        return None

    def rollout_kwargs(self, window) -> dict:
        """Traced keyword arguments of sampling.rollout that depend on `window` (e.g. sde_window)."""
        return {}

    def keep(self, out: sampling.Rollout, window) -> dict:
        """What training needs of a rollout, batch-first. Default: the final samples only."""
        return {"x0": out.latents[-1]}

    def rollout(self, velocity_fn, noise, sigmas, key, window, rows=None) -> tuple[dict, jax.Array]:
        """(keep, samples): the arrays training needs, with the scored rows first, and the samples [R, ...]
        that the world scores. `velocity_fn(x, sigma [B]) -> v` is the sampling policy with its CFG; `rows`
        [B] are the rows' indices in the epoch's batch (draw per-row noise from them: `sampling.step_noise`,
        so that micro-batched rollouts equal whole ones). When R differs from the batch, keep["source"] [R]
        int32 gives each row's row in this call (its prompt, its conditioning) and `advantages` must group
        the rows itself. A method whose `guide` returns one is called with `guide=` as well."""
        spec = self.rollout_spec()
        out = sampling.rollout(velocity_fn, noise, sigmas, key, kind=spec.kind, noise_level=spec.noise_level,
                               rows=rows, **spec.kwargs(), **self.rollout_kwargs(window))
        return self.keep(out, window), out.latents[-1]

    def rows(self, batch: int) -> int:
        """How many rows the rollout of `batch` samples returns (its scored and trained rows)."""
        return batch

    def train_micro_unit(self) -> int:
        """`train.micro_batch` (rows per device per gradient call) must be a multiple of this: the rows a gradient
        call must keep together (GDRO: a prompt's group). 1 by default; `flowjax.plan` searches its multiples."""
        return 1

    def offline_batches(self) -> int:
        """0: every epoch samples fresh rollouts with its sampler (online). n > 0: before the first epoch the
        trainer samples n batches with the REFERENCE policy (this method's rollout, the batches of epochs
        0..n-1), scores them and stores (keep, scores) in WORKDIR/rollouts/ (reused when there, so a resumed
        run samples nothing); every epoch then trains on `train.prompts_per_batch` of the stored groups
        (all groups once per pass, in a random order per pass) instead of sampling."""
        return 0

    # ---------------------------------------------------------------- advantages and minibatches

    def advantages(self, rewards, group_ids, num_groups: int, keep: dict):
        """Per-prompt group advantages (Flow-GRPO's PerPromptStatTracker) from `config.advantage`."""
        a = self.config.get("advantage") or {}
        return adv_lib.group_advantages(rewards, group_ids, num_groups=num_groups, std=a.get("std", "global"),
                                        eps=a.get("eps", 1e-4), ddof=a.get("ddof", 0), clip=None)

    def plan(self, advantages, key, minibatches: int):
        """(order [B], weights [B]): minibatch i is rows order[i*m:(i+1)*m], each row weighted in its
        minibatch's mean. Default: a random permutation, every row weight 1."""
        b = advantages.shape[0]
        return jax.random.permutation(key, b), jnp.ones((b,), jnp.float32)

    # ---------------------------------------------------------------- training

    def grads(self, ctx: Context, params, state, mb: dict, window, key):
        raise NotImplementedError

    def end_of_epoch(self, state, params, opt_step):
        """(new state, metrics) after the epoch's optimizer steps; `opt_step` counts optimizer steps."""
        return state, {}

    def nfes(self, batch: int) -> dict[str, int]:
        """Model evaluations (transformer forward passes, a CFG pair counting 2) of one epoch of `batch`
        samples: {"rollout": ..., "train": ...}. Rollouts of every kind here evaluate once per step."""
        spec = self.rollout_spec()
        cfg = 2 if spec.guidance != 1.0 else 1
        return {"rollout": int(self.config.sample.num_steps) * cfg * batch, "train": self.train_nfes(batch)}

    def train_nfes(self, batch: int) -> int:
        raise NotImplementedError


# ------------------------------------------------------------------------------------ shared pieces


def reduce_metric(name: str, values, weights):
    """One metric of K parts (timesteps, gradient calls) [K] -> the whole's, over the parts of weight > 0:
    `*_max` / `*_min` (GRPO's ratio_max / ratio_min) the largest / smallest, any other the weighted mean; 0 when
    every weight is 0."""
    kept = weights > 0
    if name.endswith(("_max", "_min")):
        pick, empty = (jnp.max, -jnp.inf) if name.endswith("_max") else (jnp.min, jnp.inf)
        return jnp.where(kept.any(), pick(jnp.where(kept, values, empty)), 0.0)
    return jnp.sum(jnp.where(kept, values, 0.0) * weights) / jnp.maximum(weights.sum(), 1e-12)


def accumulate(loss_fn, params, steps, weights=None):
    """Mean gradient and metrics (`reduce_metric`) of `loss_fn(params, step_input)` over the leading axis of
    `steps`, scanned, so memory holds one step's activations (the references' accumulation over timesteps).
    `weights` [K] leaves steps of weight 0 out of both (all zero: zero gradients and metrics)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    n = jax.tree.leaves(steps)[0].shape[0]
    w = jnp.ones((n,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)

    def body(acc, inp):
        s, wk = inp
        (_, metrics), g = grad_fn(params, s)
        return jax.tree.map(lambda a, b: a + wk * b, acc, g), metrics

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, metrics = jax.lax.scan(body, zeros, (steps, w))
    total = jnp.maximum(w.sum(), 1e-12)
    return jax.tree.map(lambda g: g / total, grads), {k: reduce_metric(k, m, w) for k, m in metrics.items()}


def velocity(apply, params, x, sigma, cond, guidance: float, integer_timesteps: bool = False):
    """The (CFG) velocity at sigma [B]: uncond + g * (cond - uncond), one batched forward for both.

    `cond` is a `Cond`; the MMDiT takes timesteps = sigma * 1000 (diffusers units), as its sinusoidal
    embedding was trained on them; floor(sigma * 1000) with `integer_timesteps`.
    """
    t = sigma * 1000.0
    if integer_timesteps:
        t = jnp.floor(t)
    if guidance == 1.0:
        return apply(params, x, t, cond.ctx, cond.pooled).astype(jnp.float32)
    both = lambda a, b: jnp.concatenate([a, b], axis=0)
    neg = lambda n, c: jnp.broadcast_to(n, c.shape).astype(c.dtype) if n.ndim < c.ndim else n
    v = apply(params, both(x, x), both(t, t), both(neg(cond.neg_ctx, cond.ctx), cond.ctx),
              both(neg(cond.neg_pooled, cond.pooled), cond.pooled))
    v_uncond, v_cond = jnp.split(v.astype(jnp.float32), 2, axis=0)
    return v_uncond + guidance * (v_cond - v_uncond)


def positions(mb: dict) -> jax.Array:
    """Each row's position in its minibatch (mb["pos"], set by the trainer; arange otherwise). Per-row random
    draws are keyed by it (`jax.random.fold_in(key, pos)`), so splitting a minibatch into micro-batches
    draws exactly what the whole minibatch would."""
    n = jax.tree.leaves(mb["advantages"])[0].shape[0]
    return mb.get("pos", jnp.arange(n, dtype=jnp.int32))


def row_keys(key, pos) -> jax.Array:
    """One PRNG key per row position."""
    return jax.vmap(lambda r: jax.random.fold_in(key, r))(pos)


def check_fraction(name: str, value, num_steps: int, *, minimum: int = 1) -> int:
    """int(num_steps * value), refused when it leaves fewer than `minimum` steps."""
    n = int(num_steps * value)
    if n < minimum:
        raise ValueError(f"{name}={value} x sample.num_steps={num_steps} leaves {n} step(s) to train; "
                         f"it needs at least {minimum}")
    return n


# ------------------------------------------------------------------------------------ registry

_REGISTRY: dict[str, str] = {
    "grpo": "flowjax.rl.grpo:FlowGRPO",
    "awm": "flowjax.rl.awm:AWM",
    "nft": "flowjax.rl.nft:DiffusionNFT",
    "tempflow": "flowjax.rl.tempflow:TempFlowGRPO",
    "euphonium": "flowjax.rl.euphonium:Euphonium",
    "gdro": "flowjax.rl.gdro:GDRO",
}


def register(name: str, target: str | type) -> None:
    """Adds a method: `target` is a Method subclass or its "module:Class" path (imported on first use)."""
    _REGISTRY[name] = target


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def method_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        raise ValueError(f"method must be one of {method_names()}, got {name!r}")
    target = _REGISTRY[name]
    if isinstance(target, str):
        module, cls = target.split(":")
        target = getattr(importlib.import_module(module), cls)
    return target


def build_method(config) -> Method:
    return method_class(config.method)(config)


def as_options(**kwargs) -> tuple:
    """Hashable rollout options for RolloutSpec.options (lists become tuples)."""
    norm = lambda v: tuple(v) if isinstance(v, (list, np.ndarray)) else v
    return tuple(sorted((k, norm(v)) for k, v in kwargs.items()))
