"""Euphonium: DanceGRPO rollouts steered by a reward gradient, trained with dual-reward GRPO.

Follows zerzerzerz/Euphonium@d9f2c39 (HunyuanVideo text-to-video) as its shipped scripts/train_grpo_hunyuan.sh
runs it. `config.method = "euphonium"`, section `config.euphonium` (`Euphonium.defaults()`).

Sampling (euphonium/grpo/grpo_sampling/flux_step.py, sampling.py, utils.py):
  - the DanceGRPO kernel (`sde_solver=True`, eta 0.25) on DanceGRPO's schedule shift(linspace(1, 0, N + 1))
    (`sample_reference_model`; 16 steps, shift 5 for HunyuanVideo), integer timesteps int(sigma * 1000);
  - on guided steps i (`should_apply_process_reward`: start_step <= i < end_step, (i - start) % interval == 0;
    the script: start 12, end -1 = the last step, interval 1, i.e. the last 4 of 16) the mean gets
    c_i * grad_x r(x_i, sigma_i), the gradient of the process reward at the step's start x_i;
    c_i = scale * delta_t with delta_t = sigma_i - sigma_{i+1} (`use_delta_t_for_gradient_scaling=true`) and
    scale = the configured scale when >= 0, else eta^2 / (2 kl_beta) (`flux_step`'s `actual_scale`); the script
    passes 0.01 = 0.25^2 / (2 * 3.125), so the defaults here (scale -1, kl_beta 3.125) give the same c_i.
    The gradient is used as is (`normalize_reward_gradient=false` in the script; the reference's optional
    normalisation divides by the norm of the whole gradient tensor of one call, not implemented here);
  - the log-prob of every step is that of the UNGUIDED mean (`use_reward_guided_mean_for_logprob=false` at
    sampling and in training), so training recomputes plain DanceGRPO log-probs and needs no reward gradient
    (`process_latent_reward_training_enabled=false`);
  - the process reward of the guided steps, the PRM's score of x_i, is kept per step (0 on the other steps).
Training (euphonium/grpo/grpo_training/trainer.py, `train_one_step`; grpo_step.py):
  - outcome advantage per group: (r - mean_group) / (std_group + 1e-8), torch's unbiased std (configs set
    `config.advantage = dict(std="per_prompt", ddof=1, eps=1e-8)`);
  - process advantage per (group, step): the same normalisation of the process rewards at that step over the
    group (a step without guidance has all-zero scores, so advantage 0);
  - a random 60% of the non-final steps per sample (`timestep_fraction` 0.6, `torch.randperm` per sample, as
    DanceGRPO); per trained step the loss is
        outcome_coef * PPO(A_outcome) + process_coef * PPO(A_process[step])   (coefficients 1 and 1),
    each PPO term mean(max(-A ratio, -A clip(ratio, 1 - 1e-4, 1 + 1e-4))) with A clipped to [-5, 5], averaged
    over samples and trained steps (the reference divides by grad accumulation x trained steps); no KL
    (`USE_KL_LOSS=false`).
Where flowjax differs, and why:
  - the shipped script's reward model returns three keys ("score" = pixel reward + 0 x latent reward, "trl" =
    the pixel reward, "latent_reward" = the PRM's score of the final x0 prediction), and `train_one_step` adds
    one outcome PPO term per key with weight `getattr(args, f"{name}_coef", 1.0)` = 1 each, i.e. effectively
    twice the pixel reward's term plus the PRM's final score; flowjax has one world reward and one outcome term
    (`outcome_coef`), as the paper's dual-reward objective states;
  - Best-of-N selection is a no-op in the script (bestofn = num_generations = 8) and is left out;
  - the gradient comes from a float32 PRM (the reference's runs in bf16);
  - the PRM's architecture is our own (flowjax.models.prm: the Latent_PRM submodule is not public); a
    differentiable world reward through x0_hat = x - sigma v (v held fixed, as the reference's SPSA option
    estimates the gradient with respect to the x0 prediction, grpo_sampling/spsa_gradient.py) can stand in for it
    (`guide.source="reward"`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from flowjax import sampling
from flowjax.rl import advantages as adv_lib
from flowjax.rl.common import ppo_clipped
from flowjax.rl.grpo import FlowGRPO

GUIDE_SOURCES = ("prm", "reward", "none")


def guidance_scales(sigmas, *, eta, scale, kl_beta, start, end=-1, interval=1, delta_t=True) -> jax.Array:
    """Euphonium's per-step guidance coefficients c [T] float32 (0 on unguided steps).

    zerzerzerz/Euphonium@d9f2c39: steps i with start <= i < end (end < 0: T) and (i - start) % interval == 0
    (grpo_sampling/utils.py `should_apply_process_reward`); c_i = s * (sigma_i - sigma_{i+1}) (with delta_t) or
    s, where s = scale if scale >= 0 else eta^2 / (2 kl_beta) (grpo_sampling/flux_step.py `actual_scale`).
    """
    sig = jnp.asarray(sigmas, jnp.float32)
    n = sig.shape[0] - 1
    coef = float(scale) if scale >= 0 else float(eta) ** 2 / (2.0 * float(kl_beta))
    end = n if end < 0 else end
    i = jnp.arange(n)
    on = (i >= start) & (i < end) & ((i - start) % interval == 0)
    c = jnp.float32(coef) * (sig[:-1] - sig[1:]) if delta_t else jnp.full((n,), coef, jnp.float32)
    return jnp.where(on, c, 0.0).astype(jnp.float32)


def dual_advantages(rewards, process_scores, group_ids, *, num_groups, std="per_prompt", eps=1e-8, ddof=1):
    """[B, T, 2]: the outcome advantage of each row (broadcast over the steps) and its process advantage per step.

    Both are group normalisations (r - mean_group) / (std_group + eps) (trainer.py `train_one_step`, "Calculate
    Outcome Reward Advantages" and "Calculate Process Reward Advantages": per group, torch.std + 1e-8), of the
    final rewards [B] and of the process scores [B, T] step by step. Not clipped (the losses clip).
    """
    norm = lambda r: adv_lib.group_advantages(r, group_ids, num_groups=num_groups, std=std, eps=eps, ddof=ddof,
                                              clip=None)
    process = jax.vmap(norm, in_axes=1, out_axes=1)(jnp.asarray(process_scores, jnp.float32))
    outcome = jnp.broadcast_to(norm(rewards)[:, None], process.shape)
    return jnp.stack([outcome, process], axis=-1)


class Euphonium(FlowGRPO):
    """Reward-gradient guided DanceGRPO rollouts and the dual-reward GRPO loss (see the module docstring).

    The guide (`guide.source`): "prm", a latent process reward model (flowjax.models.prm, trained for the world
    by `python -m flowjax.prm`, read from `guide.path`); "reward", the world's own reward of the x0 prediction
    x - sigma v (it must be differentiable and jittable: the toy world's, PickScore and the other CLIP rewards;
    not GenEval, OCR or the shapes detector); "none", no guidance (then it is DanceGRPO with the outcome term).
    Which kernels: any of sde / cps / dance (`sampling.rollout` adds the guidance to any kernel's mean); the
    c_i rule is the reference's for the DanceGRPO kernel.
    """

    name = "euphonium"
    metric_names = FlowGRPO.metric_names + ("outcome_loss", "process_loss")

    @staticmethod
    def defaults():
        c = FlowGRPO.defaults()
        # scripts/train_grpo_hunyuan.sh (d9f2c39): eta 0.25, CFG off (--cfg 0.0), timestep_fraction 0.6 of the
        # non-final steps drawn per sample, integer timesteps, DanceGRPO's schedule; no KL, no zero-advantage
        # filter, no EMA evaluation copy.
        c.update(kind="dance", noise_level=0.25, guidance=1.0, clip_range=1e-4, beta=0.0, adv_clip=5.0,
                 timestep_fraction=0.6, random_steps=True, schedule="dance", filter_zero_advantage=False,
                 integer_timesteps=True)
        c.eval_ema.decay = 0.0
        c.guide = ml_collections.ConfigDict(dict(
            source="prm",  # prm | reward | none
            path="",  # the latent PRM folder (source "prm")
            start=12, end=-1, interval=1,  # PROCESS_LATENT_REWARD_{START_STEP,END_STEP,INTERVAL}
            scale=-1.0,  # >= 0: used as is; < 0: eta^2 / (2 kl_beta)  (the script's 0.01 = 0.25^2 / (2 * 3.125))
            kl_beta=3.125,  # PROCESS_LATENT_REWARD_KL_BETA
            delta_t=True,  # USE_DELTA_T_FOR_GRADIENT_SCALING
        ))
        c.outcome_coef = 1.0  # OUTCOME_REWARD_ADVANTAGE_COEF
        c.process_coef = 1.0  # PROCESS_REWARD_ADVANTAGE_COEF (0: outcome only, the script's mode "none")
        return c

    # ---------------------------------------------------------------- configuration

    def validate(self) -> None:
        super().validate()
        c, g, n = self.cfg, self.cfg.guide, self.num_steps
        if g.source not in GUIDE_SOURCES:
            raise ValueError(f"config.euphonium.guide.source must be one of {GUIDE_SOURCES}, got {g.source!r}")
        if c.window.size:
            raise ValueError("config.euphonium.window: a MixGRPO window cannot be combined with guidance; set "
                             "window.size=0")
        end = n if g.end < 0 else g.end
        if not (0 <= g.start < end <= n) or g.interval < 1:
            raise ValueError(f"config.euphonium.guide: guided steps start={g.start}, end={g.end} (-1 = to the last), "
                             f"interval={g.interval} must satisfy 0 <= start < end <= num_steps={n}, interval >= 1")
        if g.scale < 0 and not g.kl_beta > 0:
            raise ValueError(f"config.euphonium.guide.kl_beta must be > 0 (scale < 0 uses eta^2 / (2 kl_beta)), "
                             f"got {g.kl_beta}")
        if c.outcome_coef < 0 or c.process_coef < 0:
            raise ValueError(f"config.euphonium.outcome_coef and process_coef must be >= 0, got {c.outcome_coef}, "
                             f"{c.process_coef}")
        if g.source == "none" and c.process_coef:
            raise ValueError("config.euphonium.process_coef > 0 needs process rewards from a guide; with "
                             "guide.source='none' set process_coef=0")

    def guide_scales(self, sigmas) -> jax.Array:
        g = self.cfg.guide
        return guidance_scales(sigmas, eta=float(self.cfg.noise_level), scale=float(g.scale),
                               kl_beta=float(g.kl_beta), start=int(g.start), end=int(g.end),
                               interval=int(g.interval), delta_t=bool(g.delta_t))

    # ---------------------------------------------------------------- the guide

    def guide_state(self, world):
        g = self.cfg.guide
        if g.source == "prm":
            from flowjax.models import prm as prm_lib

            if not g.path:
                raise ValueError("config.euphonium.guide.source='prm' needs the latent PRM folder: "
                                 "--config.euphonium.guide.path=DIR (train one with `python -m flowjax.prm "
                                 "--config=CONFIG:euphonium --workdir=DIR`), or guide.source='reward' for a "
                                 "differentiable world reward")
            model, _ = prm_lib.load(g.path)
            check_prm(model.config, world)
            self._prm_graphdef, params = nnx.split(model)
            return params
        if g.source == "reward":
            state = getattr(world, "state", None)
            check_differentiable(world, state, tuple(self.config.sample.latent_size))
            return state
        return None

    def guide(self, state, world, cond, prompt_ids):
        source = self.cfg.guide.source
        if source == "prm":
            return prm_guide(nnx.merge(self._prm_graphdef, state), cond.ctx, cond.pooled)
        if source == "reward":
            return reward_guide(world, state, prompt_ids)
        return None

    # ---------------------------------------------------------------- rollouts and advantages

    def rollout(self, velocity_fn, noise, sigmas, key, window, rows=None, guide=None):
        spec = self.rollout_spec()
        scales = None if guide is None else self.guide_scales(sigmas)
        out = sampling.rollout(velocity_fn, noise, sigmas, key, kind=spec.kind, noise_level=spec.noise_level,
                               rows=rows, guide=guide, guide_scale=scales)
        keep = self.keep(out, window)
        scores = out.guide_scores if out.guide_scores is not None else jnp.zeros_like(out.log_probs)
        keep["process_scores"] = scores.T  # [B, T]
        return keep, out.latents[-1]

    def advantages(self, rewards, group_ids, num_groups, keep):
        a = self.config.get("advantage") or {}
        return dual_advantages(rewards, keep["process_scores"], group_ids, num_groups=num_groups,
                               std=a.get("std", "global"), eps=a.get("eps", 1e-4), ddof=a.get("ddof", 0))

    # ---------------------------------------------------------------- training

    def transition_loss(self, lp, old_log_prob, adv, ref_mean, weights):
        """outcome_coef x PPO(A_outcome) + process_coef x PPO(A_process) (+ beta x KL); adv [B, 2] at the step."""
        c = self.cfg
        oc, pc = float(c.outcome_coef), float(c.process_coef)
        loss, metrics = super().transition_loss(lp, old_log_prob, adv[:, 0], ref_mean, weights)
        ratio = jnp.exp(lp.log_prob - jax.lax.stop_gradient(old_log_prob))
        clipped = lambda a: jnp.clip(a, -float(c.adv_clip), float(c.adv_clip))
        e = float(c.clip_range)
        process = ppo_clipped(ratio, clipped(adv[:, 1]), e, weights)
        if pc:  # (process_coef 0 leaves DanceGRPO's loss exactly)
            loss = loss + pc * process
        if oc != 1.0:  # super's loss holds the outcome term once
            loss = loss + (oc - 1.0) * ppo_clipped(ratio, clipped(adv[:, 0]), e, weights)
        sg = jax.lax.stop_gradient
        outcome = metrics["policy_loss"]
        metrics.update(loss=sg(loss), policy_loss=sg(oc * outcome + pc * process), outcome_loss=outcome,
                       process_loss=sg(process))
        return loss, metrics

    def nfes(self, batch: int) -> dict[str, int]:
        """The transformer evaluations of FlowGRPO, plus `guide`: guide evaluations (PRM or reward gradients)."""
        out = super().nfes(batch)
        if self.cfg.guide.source != "none":
            # the guided steps of a strictly decreasing schedule (no need to build it: sample.shift may be
            # "dynamic", a world's own schedule); none with a zero scale
            g, n = self.cfg.guide, self.num_steps
            end = n if g.end < 0 else g.end
            steps = len(range(int(g.start), int(end), int(g.interval))) if g.scale != 0 else 0
            out["guide"] = steps * batch
        return out


# ------------------------------------------------------------------------------------ guides


def prm_guide(model, ctx, pooled):
    """guide(x, sigma, v) -> (PRM scores [B], their gradient with respect to x) for the rows' conditioning."""

    def guide(x, sigma, v):
        del v
        scores_of = lambda z: model(z, sigma, ctx, pooled)
        scores, pullback = jax.vjp(scores_of, x)
        return scores, pullback(jnp.ones_like(scores))[0]

    return guide


def reward_guide(world, state, prompt_ids):
    """guide(x, sigma, v) -> (the world's reward of x0_hat = x - sigma v, its gradient with respect to x0_hat).

    v is held fixed (the gradient is the reward's at the x0 prediction, as Euphonium's SPSA option estimates it,
    grpo_sampling/spsa_gradient.py), so no backward pass through the flow model is needed."""

    def guide(x, sigma, v):
        x0 = x - sigma.reshape((-1,) + (1,) * (x.ndim - 1)) * jax.lax.stop_gradient(v)
        rewards_of = lambda z: world.score(z, prompt_ids, state)["reward"].astype(jnp.float32)
        scores, pullback = jax.vjp(rewards_of, x0)
        return scores, pullback(jnp.ones_like(scores))[0]

    return guide


def check_prm(config, world) -> None:
    """The PRM must read the world's latents and conditioning; a ValueError names what differs."""
    shapes = getattr(world, "cond_shapes", None)
    want = {"in_channels": world.channels}
    if shapes is not None:
        want.update(text_dim=shapes[0][-1], pooled_dim=shapes[1][-1])
    wrong = {k: (getattr(config, k), v) for k, v in want.items() if getattr(config, k) != v}
    if wrong:
        raise ValueError("the latent PRM does not fit this world (" + ", ".join(
            f"{k}: PRM {a}, world {b}" for k, (a, b) in wrong.items()) + "); train one for it with "
            "`python -m flowjax.prm --config=CONFIG:euphonium --workdir=DIR`")


def check_differentiable(world, state, latent_size) -> None:
    """Traces the reward's gradient once (shapes only): a host reward (GenEval, remote servers) cannot be
    differentiated, and says so here rather than inside the first rollout."""
    x = jax.ShapeDtypeStruct((1, *latent_size, world.channels), jnp.float32)
    ids = jax.ShapeDtypeStruct((1,), jnp.int32)
    try:
        jax.eval_shape(lambda z, i: jax.grad(lambda a: world.score(a, i, state)["reward"].sum())(z), x, ids)
    except Exception as e:  # noqa: BLE001 - any failure to trace the gradient makes the reward unusable as a guide
        raise ValueError(f"config.euphonium.guide.source='reward' needs a jittable, differentiable world reward; "
                         f"its gradient cannot be traced ({type(e).__name__}: {str(e).splitlines()[0][:300]}). "
                         "Use guide.source='prm' with a latent PRM (python -m flowjax.prm) instead") from None
