"""GDRO: Group-level Direct Reward Optimization, as pure functions and a `Method`.

Follows the paper: Wang, Chen, Xu, Liu, Zhao, "GDRO: Group-level Reward Post-training Suitable for Diffusion
Models", arXiv 2601.02036v1 (CVPR 2026). The authors have released no code ("code: to be confirmed"; none found
in public repositories or issue trackers when this was written), so this is a re-implementation from the
paper's description and nothing here could be checked against reference code. The stored copy of the paper
available when this was written held its abstract and introduction only; the method's details below are those
that issue 13 of this project states from the paper, and every choice that the paper does not fix (as far as
that record goes) is marked CHOSEN.

The method (for one prompt, a group of k images x0_1..x0_k with explicit rewards r_1..r_k):

- implicit reward of image i, DPO-style (Diffusion-DPO's reward in flow-matching form):
      s_i = -beta * E_{t, eps} [ |v - v_theta(x_t, t)|^2 - |v - v_ref(x_t, t)|^2 ],
      x_t = (1 - t) x0_i + t eps,  v = eps - x0_i,
  v_ref the frozen reference model (LoRA off). Forward-noised images: no sampler trajectory is needed, so
  training is sampler-independent and can run offline on a fixed dataset.
- ranking loss: the Plackett-Luce likelihood of the reward ranking under the implicit rewards, with soft
  targets. Rank the group by r (descending); at stage j the items not yet ranked are R_j = {pi_j, ..., pi_k},
  the target distribution over them softmax(r / tau) restricted to R_j, the model's softmax(s) restricted to
  R_j, and the stage's loss their cross-entropy:
      L_rank = sum_{j=1}^{k-1} CE( softmax_{R_j}(r / tau), softmax_{R_j}(s) ).
  For k = 2 and tau -> 0 the target is the winner and L_rank = -log sigmoid(s_w - s_l): Diffusion-DPO's loss
  (Wallace et al. 2023, arXiv 2311.12908, eq. 14) in flow-matching form, its beta T omega(lambda_t) being
  beta * beta_T here (below).
- plus gamma times the flow-matching loss of the group's best image (argmax r): |v - v_theta(x_t, t)|^2.
- settings of the paper: k = 6, tau = 0.05, beta 6 (GenEval) / 12 (OCR), gamma 1.0 (GenEval) / 0.5 (OCR).
- online (rollouts each epoch by any solver; ODE by default) or offline (`offline=True`: a fixed dataset
  sampled and scored once with the reference model, then many epochs without sampling).

CHOSEN where the paper (as recorded here) is silent:
- squared errors are means over C, H, W (as Diffusion-DPO's public training code, SalesforceAIResearch/
  DiffusionDPO `train.py`, takes `.mean` over the non-batch dims);
- the scale of the implicit reward: Diffusion-DPO's eq. 14 multiplies the error differences by
  beta * T * omega(lambda_t) (T = 1000 steps); here omega = 1 and the factor is beta * `beta_T`, with
  beta_T = 1000 by default, which puts the paper's beta 6 / 12 at Diffusion-DPO's scale (its code multiplies
  mean errors by 0.5 * beta_dpo and is launched with beta_dpo 5000: SalesforceAIResearch/DiffusionDPO
  `train.py`). beta_T = 1 reads the formula above literally (implicit rewards of order 1e-3 on SD3.5 latents,
  a loss that hardly ever saturates);
- the expectation over (t, eps) stays inside the implicit reward, as the formula above has it
  (`expectation="inside"`): each minibatch draws `num_train_timesteps` (t, eps), averages each image's errors
  over them and takes one loss; its exact gradient is accumulated draw by draw in two passes (memory of one
  draw; one more policy forward per draw). `expectation="outside"` is Diffusion-DPO's eq. 14 instead (Jensen,
  from its eq. 13: one loss per draw, averaged). The two agree for one draw;
- by default the k images of a group share the draw's t and eps (`shared_noise=True`; the group is compared
  at the same noise, which removes the noise's variance from the rewards' differences); False draws them
  per image;
- t: `timesteps="uniform"`: t ~ U(0, 1) continuous (Diffusion-DPO draws its training timestep uniformly);
  `"schedule"`: a sigma of the rollout schedule, uniform over its first int(num_steps * timestep_fraction)
  steps (as AWM / DiffusionNFT here);
- the ranking loss sums its k - 1 stages (the Plackett-Luce log-likelihood of the whole ranking) and is
  averaged over the groups; tied rewards are ranked in row order (stable sort) and share their soft target;
- the best image of a group with tied top rewards is the first in row order;
- no CFG in the training forwards (the implicit reward compares conditional predictions, as Diffusion-DPO).

Engineering (not the paper's): a minibatch holds whole groups (`group_plan`); the trainer's padding rows
(weight 0, to a multiple of the devices) are completed here into groups of their own with weight 0, and
`train.micro_batch` must be a multiple of k so that every gradient call holds whole groups; the (t, eps) draws
are keyed by the rows' positions in the minibatch, so micro-batched calls train exactly what one call would.
The offline dataset is sampled by the trainer's ordinary rollout (in `sample.micro_batch` calls with per-row
noise, so it does not depend on the micro-batching) and stored by `flowjax.rl.rollout_store`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections

from flowjax import sampling
from flowjax.rl.awm import awm_noised
from flowjax.rl.common import f32, per_sample_mean
from flowjax.rl.method import Method, RolloutSpec, accumulate, positions, row_keys, velocity

_MASKED = -1e30  # logit of an item already ranked (finite, so that 0 * logit stays 0 and gradients stay finite)


# --------------------------------------------------------------------------- pure functions


def velocity_errors(v, target) -> jax.Array:
    """|v - target|^2 per image [B]: the mean over C, H, W, in float32."""
    return per_sample_mean((f32(v) - f32(target)) ** 2)


def implicit_rewards(v_theta, v_ref, target, beta: float) -> jax.Array:
    """GDRO's implicit rewards [B] at one draw of (t, eps): -beta * (|target - v_theta|^2 - |target - v_ref|^2),
    target = eps - x0. v_ref is treated as a constant. Positive where the policy fits the image better than
    the reference does."""
    err_ref = jax.lax.stop_gradient(velocity_errors(v_ref, target))
    return -beta * (velocity_errors(v_theta, target) - err_ref)


def _stage_masks(k: int) -> jax.Array:
    """[k stages, k items] bool: at stage j the items j.. of the ranking are not yet ranked."""
    return jnp.arange(k)[None, :] >= jnp.arange(k)[:, None]


def plackett_luce_losses(implicit, rewards, tau: float) -> jax.Array:
    """Per-group soft-target Plackett-Luce loss [G] of implicit rewards [G, k] against explicit rewards [G, k]:
    the sum over the first k - 1 stages of the ranking by reward of CE(softmax(r / tau), softmax(s)) over the
    items not yet ranked (see the module docstring)."""
    s, r = f32(implicit), f32(rewards)
    if s.ndim != 2 or s.shape != r.shape:
        raise ValueError(f"implicit and explicit rewards must both be [groups, k], got {s.shape} and {r.shape}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    k = s.shape[1]
    order = jnp.argsort(-r, axis=1, stable=True)  # best first; ties in row order
    s_sorted = jnp.take_along_axis(s, order, axis=1)
    r_sorted = jnp.take_along_axis(r, order, axis=1)
    mask = _stage_masks(k)[None]  # [1, stages, items]
    target = jax.nn.softmax(jnp.where(mask, r_sorted[:, None, :] / tau, _MASKED), axis=-1)
    log_model = jax.nn.log_softmax(jnp.where(mask, s_sorted[:, None, :], _MASKED), axis=-1)
    ce = -jnp.sum(jnp.where(mask, target * log_model, 0.0), axis=-1)  # [G, stages]
    return jnp.sum(ce[:, : k - 1], axis=1)


def gdro_loss(implicit_rewards, rewards, tau: float) -> jax.Array:
    """GDRO's ranking loss (scalar float32): the mean over groups of `plackett_luce_losses`.

    implicit_rewards, rewards: [G, k] (G groups of k images of one prompt each); tau > 0 the temperature of
    the soft targets softmax(r / tau) (the paper: 0.05)."""
    return jnp.mean(plackett_luce_losses(implicit_rewards, rewards, tau))


def best_image_errors(errors, rewards) -> jax.Array:
    """[G]: the flow-matching error of each group's best image (argmax reward; the first on ties)."""
    e, r = f32(errors), f32(rewards)
    best = jnp.argmax(r, axis=1)
    return jnp.take_along_axis(e, best[:, None], axis=1)[:, 0]


def implicit_accuracy(implicit, rewards) -> jax.Array:
    """The fraction of the pairs (i, j) of a group with r_i > r_j whose implicit rewards agree (s_i > s_j),
    over all groups (0.5 where no pair has different rewards): DPO's "reward accuracy" for groups."""
    s, r = f32(implicit), f32(rewards)
    better = r[:, :, None] > r[:, None, :]
    agree = better & (s[:, :, None] > s[:, None, :])
    n = jnp.sum(better)
    return jnp.where(n > 0, jnp.sum(agree) / jnp.maximum(n, 1), 0.5)


def gdro_loss_from_errors(errors, ref_errors, rewards, *, group_size: int, beta: float, tau: float,
                          gamma: float, weights=None):
    """GDRO's loss and metrics from per-image flow-matching errors [G * k] (each group's k = `group_size` rows
    consecutive): the policy's |v - v_theta|^2 and the reference's |v - v_ref|^2 (a constant), at one draw of
    (t, eps) or averaged over draws (the expectation inside the implicit reward). rewards [G * k] explicit.

    loss = gdro_loss(s, r, tau) + gamma * the mean over groups of the best image's error,
    s = -beta * (errors - ref_errors). Metrics: loss, rank_loss, fm_loss, implicit_reward_mean,
    implicit_reward_std (within a group, averaged), implicit_accuracy, policy_error and ref_error (mean errors).

    weights [G * k] (optional, 1 by default): a group's weight is the mean of its rows' (the trainer's padding
    rows have weight 0 and fill whole groups of their own, see `GDRO.grads`), and every mean over groups or
    rows is weighted by it; groups of weight 0 add nothing, to the loss or to its gradient."""
    r, e = f32(rewards), f32(errors)
    rows = r.shape[0]
    if e.shape != (rows,) or rows % group_size:
        raise ValueError(f"errors {e.shape} and rewards [{rows}] must be [rows] with rows a multiple of {group_size}")
    groups = rows // group_size
    w = jnp.ones((groups,), jnp.float32) if weights is None else f32(weights).reshape(groups, group_size).mean(1)
    total = jnp.maximum(jnp.sum(w), 1e-12)
    wmean = lambda x: jnp.sum(w * x) / total  # over groups
    e_ref = jax.lax.stop_gradient(f32(ref_errors))
    s = -beta * (e - e_ref)
    s_g, r_g, e_g, ref_g = (a.reshape(groups, group_size) for a in (s, r, e, e_ref))
    rank = wmean(plackett_luce_losses(s_g, r_g, tau))
    fm = wmean(best_image_errors(e_g, r_g))
    loss = rank + gamma * fm
    sg = jax.lax.stop_gradient
    live = (w > 0)[:, None]
    metrics = {
        "loss": sg(loss),
        "rank_loss": sg(rank),
        "fm_loss": sg(fm),
        "implicit_reward_mean": sg(wmean(jnp.mean(s_g, axis=1))),
        "implicit_reward_std": sg(wmean(jnp.std(s_g, axis=1))),
        "implicit_accuracy": sg(implicit_accuracy(jnp.where(live, s_g, 0.0), jnp.where(live, r_g, 0.0))),
        "policy_error": sg(wmean(jnp.mean(e_g, axis=1))),
        "ref_error": wmean(jnp.mean(ref_g, axis=1)),
    }
    return loss, metrics


def gdro_objective(v_theta, v_ref, target, rewards, *, group_size: int, beta: float, tau: float, gamma: float):
    """GDRO's loss at one draw of (t, eps), and its metrics (`gdro_loss_from_errors`).

    v_theta, v_ref, target: [G * k, ...] velocities and targets (eps - x0) with each group's k = `group_size`
    rows consecutive; rewards [G * k]; s = implicit_rewards(v_theta, v_ref, target, beta)."""
    if v_theta.shape[0] != f32(rewards).shape[0]:
        raise ValueError(f"{v_theta.shape[0]} velocity rows and {f32(rewards).shape[0]} rewards must match")
    return gdro_loss_from_errors(velocity_errors(v_theta, target), velocity_errors(v_ref, target), rewards,
                                 group_size=group_size, beta=beta, tau=tau, gamma=gamma)


TIMESTEPS = ("uniform", "schedule")
EXPECTATIONS = ("inside", "outside")


def gdro_draws(key, groups: int, group_size: int, shape, *, num_draws: int, shared: bool = True,
               timesteps: str = "uniform", sigmas=None, timestep_fraction: float = 1.0, pos=None):
    """The training draws of one minibatch: (t [K, G * k], eps [K, G * k, *shape]) float32, K = num_draws.

    Rows are group-major (each group's k rows consecutive). `shared`: the k images of a group get the same t and
    the same eps at each draw (else each row its own). `timesteps`: "uniform", t ~ U(0, 1); "schedule",
    t = sigmas[i] with i uniform in [0, int(num_steps * timestep_fraction)), sigmas the rollout schedule
    [num_steps + 1] (CHOSEN: see the module docstring). `pos` [G * k]: the rows' positions in their minibatch
    (`method.positions`; arange by default); a group's draws are keyed by its first row's position (a row's by
    its own when not shared), so a minibatch split into `train.micro_batch` calls draws what the whole would."""
    if timesteps not in TIMESTEPS:
        raise ValueError(f"timesteps must be one of {TIMESTEPS}, got {timesteps!r}")
    rows = groups * group_size
    pos = jnp.arange(rows, dtype=jnp.int32) if pos is None else jnp.asarray(pos, jnp.int32)
    keys = row_keys(key, pos.reshape(groups, group_size)[:, 0] if shared else pos)
    if timesteps == "schedule":
        sig = f32(sigmas)
        hi = int((sig.shape[0] - 1) * timestep_fraction)
        if hi < 1:
            raise ValueError(f"timestep_fraction={timestep_fraction} of {sig.shape[0] - 1} steps leaves none")

    def one(k):
        k_t, k_eps = jax.random.split(k)
        if timesteps == "uniform":
            t = jax.random.uniform(k_t, (num_draws,), jnp.float32)
        else:
            t = sig[jax.random.randint(k_t, (num_draws,), 0, hi)]
        return t, jax.random.normal(k_eps, (num_draws, *shape), jnp.float32)

    t, eps = jax.vmap(one)(keys)
    t, eps = t.T, jnp.moveaxis(eps, 0, 1)
    if shared:
        t, eps = jnp.repeat(t, group_size, axis=1), jnp.repeat(eps, group_size, axis=1)
    return t, eps


def group_plan(group_ids, key, group_size: int):
    """(order [B] int32, weights [B] ones): the groups in a random order, each group's rows consecutive, so that
    minibatch i = order[i*m:(i+1)*m] holds m / k whole groups when k divides m. group_ids [B] name each row's
    group; every group has exactly `group_size` rows (the k-repeat sampler's batches)."""
    g = jnp.asarray(group_ids).astype(jnp.int32)
    b = g.shape[0]
    if b % group_size:
        raise ValueError(f"{b} rows do not split into groups of {group_size}")
    rows = jnp.argsort(g, stable=True).reshape(b // group_size, group_size)
    order = rows[jax.random.permutation(key, b // group_size)].reshape(-1)
    return order.astype(jnp.int32), jnp.ones((b,), jnp.float32)


# --------------------------------------------------------------------------- the method


class GDRO(Method):
    """GDRO, `config.method = "gdro"` (arXiv 2601.02036; no public code, see the module docstring).

    Online: each epoch samples k = `train.group_size` images per prompt with `solver` (ODE by default; GDRO
    needs no stochastic sampler) and keeps only the final samples; the world scores them; `advantages` passes
    the RAW rewards through (GDRO ranks rewards within a group, it does not normalise them), with each row's
    group id, and `plan` keeps each group whole inside one minibatch. Each minibatch draws
    `num_train_timesteps` (t, eps) (shared within a group unless `shared_noise=False`) and takes
    the loss of the implicit rewards (`gdro_loss_from_errors`, the reference policy's velocities with LoRA off).
    Offline (`offline=True`): the trainer samples `offline_batches` batches once with the reference policy,
    scores them, keeps them in WORKDIR/rollouts/ and trains every epoch on `train.prompts_per_batch` of their
    groups, without sampling (`Method.offline_batches`).
    """

    name = "gdro"
    metric_names = ("loss", "rank_loss", "fm_loss", "implicit_reward_mean", "implicit_reward_std",
                    "implicit_accuracy", "policy_error", "ref_error")

    @staticmethod
    def defaults():
        return ml_collections.ConfigDict(dict(
            solver="ode",  # the rollout sampler (sampling.rollout kind); GDRO is sampler-independent
            noise_level=0.0,  # of a stochastic solver
            guidance=4.5,  # CFG of the rollouts (CHOSEN: SD3.5-M's usual 4.5); training forwards are CFG-free
            beta=6.0,  # implicit-reward scale: 6 GenEval, 12 OCR (the paper)
            beta_T=1000.0,  # Diffusion-DPO's T in beta * T * omega(lambda_t), omega = 1 (CHOSEN, see above)
            tau=0.05,  # temperature of the soft ranking targets softmax(r / tau) (the paper)
            gamma=1.0,  # weight of the best image's flow-matching loss: 1.0 GenEval, 0.5 OCR (the paper)
            shared_noise=True,  # one (t, eps) per group and draw (CHOSEN); False: per image
            num_train_timesteps=1,  # (t, eps) draws per minibatch (CHOSEN: one, as Diffusion-DPO)
            expectation="inside",  # s from the errors averaged over the draws (the formula); "outside": Jensen
            timesteps="uniform",  # t ~ U(0, 1) (CHOSEN); "schedule": the rollout schedule's sigmas
            timestep_fraction=1.0,  # with timesteps="schedule": the first int(num_steps * fraction) steps
            offline=False,  # the paper's offline mode: a fixed dataset sampled once by the reference model
            offline_batches=16,  # its size in batches of train.prompts_per_batch x train.group_size
        ))

    def validate(self) -> None:
        c, t = self.cfg, self.config.train
        if not c.tau > 0 or not c.beta > 0 or not c.beta_T > 0 or c.gamma < 0:
            raise ValueError(f"config.gdro needs tau > 0, beta > 0, beta_T > 0 and gamma >= 0, got tau={c.tau}, "
                             f"beta={c.beta}, beta_T={c.beta_T}, gamma={c.gamma}")
        if c.num_train_timesteps < 1:
            raise ValueError(f"config.gdro.num_train_timesteps must be >= 1, got {c.num_train_timesteps}")
        if c.expectation not in EXPECTATIONS:
            raise ValueError(f"config.gdro.expectation must be one of {EXPECTATIONS}, got {c.expectation!r}")
        if c.timesteps not in TIMESTEPS:
            raise ValueError(f"config.gdro.timesteps must be one of {TIMESTEPS}, got {c.timesteps!r}")
        if c.timesteps == "schedule" and int(self.config.sample.num_steps * c.timestep_fraction) < 1:
            raise ValueError(f"config.gdro.timestep_fraction={c.timestep_fraction} x sample.num_steps="
                             f"{self.config.sample.num_steps} leaves no step to draw t from")
        if c.solver not in sampling.KINDS + sampling.SOLVERS:
            raise ValueError(f"config.gdro.solver must be one of {sampling.KINDS + sampling.SOLVERS}, got {c.solver!r}")
        if c.guidance < 1.0:
            raise ValueError(f"config.gdro.guidance must be >= 1 (1 = no CFG), got {c.guidance}")
        if t.prompts_per_batch % t.minibatches:
            raise ValueError(f"GDRO ranks the {t.group_size} images of a prompt together, so every minibatch must "
                             f"hold whole groups: train.prompts_per_batch={t.prompts_per_batch} must be a multiple "
                             f"of train.minibatches={t.minibatches}")
        micro = int(t.get("micro_batch", 0) or 0)
        if micro % self.train_micro_unit():
            raise ValueError(f"GDRO ranks the {t.group_size} images of a prompt together, so a gradient call must "
                             f"hold whole groups: train.micro_batch={micro} (rows per device per call) must be a "
                             f"multiple of train.group_size={t.group_size}, or 0")
        if c.offline and c.offline_batches < 1:
            raise ValueError(f"config.gdro.offline needs offline_batches >= 1, got {c.offline_batches}")
        super().validate()

    def rollout_spec(self):
        return RolloutSpec(kind=self.cfg.solver, noise_level=float(self.cfg.noise_level),
                           guidance=float(self.cfg.guidance))

    def train_micro_unit(self) -> int:
        return int(self.config.train.group_size)

    def offline_batches(self) -> int:
        return int(self.cfg.offline_batches) if self.cfg.offline else 0

    def advantages(self, rewards, group_ids, num_groups, keep):
        """[B, 2]: each row's raw reward and its group id (GDRO ranks raw rewards within a group; `plan` and
        `grads` need the groups)."""
        return jnp.stack([f32(rewards), f32(group_ids)], axis=1)

    def plan(self, advantages, key, minibatches):
        return group_plan(advantages[:, 1], key, int(self.config.train.group_size))

    def train_nfes(self, batch):
        """Policy and reference per draw, CFG-free; "inside" evaluates the policy once more (its two passes)."""
        per_draw = 3 if self.cfg.expectation == "inside" else 2
        return int(self.cfg.num_train_timesteps) * batch * per_draw

    def grads(self, ctx, params, state, mb, window, key):
        """The minibatch's rows are whole groups, group-major (`plan`), then the trainer's padding rows of weight 0
        (under one row per device, or whole micro-batch units; `validate` keeps train.micro_batch a multiple of
        k, so every call's groups stay whole). Rows up to the next multiple of k are added here as more weight-0
        rows, so that the padding forms groups of its own, weighted 0."""
        c, k = self.cfg, int(self.config.train.group_size)
        n = mb["x0"].shape[0]
        weights, pos = f32(mb.get("weights", jnp.ones((n,), jnp.float32))), positions(mb)
        cond = mb["cond"]
        x0, rewards = mb["x0"], mb["advantages"][:, 0]
        if n % k:  # the trainer's padding: complete its last group with more weight-0 rows
            extra = k - n % k
            idx = jnp.concatenate([jnp.arange(n), jnp.zeros((extra,), jnp.int32)])
            x0, rewards, cond = x0[idx], rewards[idx], cond.rows(idx)
            weights = jnp.concatenate([weights, jnp.zeros((extra,), jnp.float32)])
            pos = jnp.concatenate([pos, jnp.max(pos) + 1 + jnp.arange(extra, dtype=jnp.int32)])
        t_all, eps_all = gdro_draws(key, x0.shape[0] // k, k, x0.shape[1:], num_draws=int(c.num_train_timesteps),
                                    shared=bool(c.shared_noise), timesteps=c.timesteps, sigmas=ctx.sigmas,
                                    timestep_fraction=float(c.timestep_fraction), pos=pos)
        loss_of = functools.partial(gdro_loss_from_errors, rewards=rewards, group_size=k, weights=weights,
                                    beta=float(c.beta * c.beta_T), tau=float(c.tau), gamma=float(c.gamma))

        def errors(p, inp):
            """|eps - x0 - v_p(x_t, t)|^2 per image at one draw; no CFG in training."""
            t, eps = inp
            v = velocity(ctx.apply, p, awm_noised(x0, eps, t), t, cond, 1.0)
            return velocity_errors(v, eps - f32(x0))

        if c.expectation == "outside":  # Diffusion-DPO's eq. 14: one loss per draw, averaged
            return accumulate(lambda p, inp: loss_of(errors(p, inp), errors(ctx.ref_params, inp)), params,
                              (t_all, eps_all))
        # "inside": s from the errors averaged over the draws, then one loss. Its exact gradient in two passes,
        # so that memory holds one draw's activations: the mean errors (no gradient), d loss / d errors, then
        # the gradient of sum_i w_i * errors_i accumulated over the draws.
        both = jax.lax.map(lambda inp: (errors(params, inp), errors(ctx.ref_params, inp)), (t_all, eps_all))
        mean_err, mean_ref = (jax.lax.stop_gradient(jnp.mean(e, axis=0)) for e in both)
        (_, metrics), weights = jax.value_and_grad(lambda e: loss_of(e, mean_ref), has_aux=True)(mean_err)
        grads, _ = accumulate(lambda p, inp: (jnp.sum(weights * errors(p, inp)), {}), params, (t_all, eps_all))
        return grads, metrics
