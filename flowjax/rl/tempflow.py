"""TempFlow-GRPO: trajectory branching for per-step (process) rewards, noise-aware weighting, seed groups.

Follows Shredded-Pork/TempFlow-GRPO e66824e: `scripts/train_sd3_pr.py` (sampling and "grpo logic"),
`flow_grpo/diffusers_patch/sd3_pipeline_with_logprob_perstep.py` (the branched rollout),
`flow_grpo/diffusers_patch/sd3_sde_with_logprob{,_perstep}.py` (the SDE step and what it returns), and
`config/dgx.py:{geneval,pickscore}_sd3_pr` (63e4def; unchanged at ed13a54). The maths:

Rollout, per initial noise ("seed") x_0, T = sample.num_steps, branch steps i < n = int(T * timestep_fraction):
  - a deterministic trunk with CFG: v_i = v(x_i, s_i), x_{i+1} = x_i + (s_{i+1} - s_i) v_i (Euler ODE);
  - K = `branches` (6) branches per branch step i take ONE Flow-GRPO SDE step from the trunk state with the
    trunk's own v_i: x_{i+1}^k = mean(x_i, v_i) + std_t(s_i) sqrt(s_i - s_{i+1}) eps_{i,k}
    (`sampling.sde_step`, a = 0.7), and keep its log-prob;
  - every branch then runs the ODE from s_{i+1} to 0 (T - 1 - i evaluations); its final sample's reward is
    step i's process reward.
  The reference branches at every step but the last (`timesteps[:-1]`: 9 of 10) and trains all of them
  (num_train_timesteps = int(10 * 0.99) = 9); here the branch steps are the trained steps, the same 9.
  Model evaluations per seed: n (trunk) + K * sum_{i<n} (T - 1 - i) (branches), each a CFG pair; the
  reference's issue #3 gives (9 + 8 + ... + 1) * N K for N seeds.

Advantages: per (seed, branch step) over its K branches ("seed group"),
  A = (r - mean_group(r)) / (std_group(r) + 1e-4), population std (`config.advantage`, std "per_prompt"
  meaning the group here). The reference's PerPromptStatTracker groups by prompt text per process and
  step column (rewards [B K, steps]); with its one seed per device per sampling batch that is the seed's
  group unless a device draws the same prompt twice in an epoch (config `global_std=False`).

Loss per trained row (seed, branch k, step i), as the reference's micro-step j:
  A      = clamp(A, -5, 5)
  ratio  = exp(log_prob - old_log_prob)            (log_prob of x_{i+1}^k given the trunk's x_i, CFG 4.5)
  policy = mean( max(-w_i A ratio, -w_i A clamp(ratio, 1 - e, 1 + e)) ),   e = 1e-4
  kl     = mean( mean_{C,H,W}(mean - ref_mean)^2 / (2 (std_t(s_i) sqrt(s_i - s_{i+1}))^2) )
  loss   = policy + beta kl                         (beta 0.004 GenEval, 0.001 PickScore; KL unweighted)
  w_i    = std_t(s_i) sqrt(s_i - s_{i+1}) / mean over the trained steps (`noise_weights`). The reference writes
           `2.25 * std_dev_t` with std_dev_t the step's std (sqrt(-dt) included: the 4th value its
           sde_step_with_logprob returns); 2.25 ~ 1 / that mean for SD3.5-M, 10 steps, shift 3, a = 0.7
           (2.2522 exactly), "to keep policy : kl = 1:1" (the authors, issue #11). Its KL divides by the
           same std, sqrt(-dt) included ("the original paper's case"; the alternative, std_t alone, is
           commented out there with "beta x 10"). Its `-2.25 * std_dev_t * advantages * ratio` broadcasts
           [m,1,1,1] against [m] to [m,1,1,m]: harmless, every row of a micro-step is at the same step.

Rows are the reference's: a (seed, branch) unit carries its n trained steps (x_i, x_{i+1}^k, old log-prob,
advantage), batch-first in the order (seed, branch, step). Minibatches take whole units (`plan`), as the
reference's minibatches of (seed, k) samples train all their steps; Flow-GRPO's filter drops units whose
advantages are 0 on every step. EMA evaluation copy 0.9 every 8 micro-batches (train_sd3_pr.py).
Scale: `sample.micro_batch` rolls out a few seeds per call (each seed's branch noise is drawn from its row in the
epoch's batch, and its (seed, step) groups are numbered by that row, so the calls equal one whole-batch call);
`train.micro_batch` and the trainer's zero-weight padding of a minibatch to the mesh may cut units: `grads`
takes any rows (padding its chunks with weight 0 and combining them by their weight sums).
The reference also skips epochs 0 and 1 entirely (`if epoch < 2: continue`); that is not reproduced.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flowjax import sampling
from flowjax.rl import advantages as adv_lib
from flowjax.rl.common import f32
from flowjax.rl.grpo import FlowGRPO, grpo_loss, zero_advantage_plan
from flowjax.rl.method import Cond, Method, RolloutSpec, accumulate, velocity


# ------------------------------------------------------------------------------------ noise-aware weights


def noise_weights(sigmas, noise_level, trained_steps) -> jax.Array:
    """The noise-aware weights [len(trained_steps)] (float32): w_i = std_t(s_i) sqrt(s_i - s_{i+1}) divided by
    its mean over `trained_steps`, std_t Flow-GRPO's `sampling.sde_std_t` (sigmas[1] in the denominator at
    sigma = 1). For SD3.5-M's schedule (10 steps, shift 3), a = 0.7 and the 9 trained steps, 1 / mean of the
    raw values is 2.2522: the constant TempFlow-GRPO hard-codes (train_sd3_pr.py e66824e, `2.25 * std_dev_t`)."""
    sig = f32(sigmas)
    idx = jnp.asarray(trained_steps, jnp.int32)
    if idx.ndim != 1 or idx.shape[0] < 1:
        raise ValueError(f"trained_steps must be a non-empty 1-D list of step indices, got shape {idx.shape}")
    s, s_next = sig[idx], sig[idx + 1]
    raw = sampling.sde_std_t(s, noise_level, sig[1]) * jnp.sqrt(s - s_next)
    return raw / jnp.mean(raw)


# ------------------------------------------------------------------------------------ the branched rollout


class BranchRollout(NamedTuple):
    """A branched rollout of B seeds, n branch steps, K branches (float32; axes [n, K, B, ...])."""

    latents: jax.Array  # [n, B, ...] the trunk's x_i (the state each step-i branch leaves from)
    next_latents: jax.Array  # [n, K, B, ...] x_{i+1}^k, the branches' SDE samples
    log_probs: jax.Array  # [n, K, B] log-prob of each SDE step under the rollout's velocity
    samples: jax.Array  # [n, K, B, ...] each branch's final ODE sample (its process reward's image)
    evaluations: int  # velocity evaluations per seed actually run (trunk + packed branch lanes)


def lane_plan(num_steps: int, branch_steps: int, branches: int) -> dict[str, np.ndarray]:
    """How the branches' ODE tails are packed into lanes of one scan (static, NumPy).

    The tail of a step-i branch has T - 1 - i ODE steps; pairing step i with step n - 1 - i (same branch)
    gives lanes of exactly C = 2T - 1 - n steps, so one `lax.scan` of C iterations over L lanes runs every
    tail with no idle evaluation (middle steps of an odd n pair two branches; with an odd K one lane
    idles half the time). Segment s = i * K + k. Returns int32 arrays [C, L]: `sig_idx` (sigma index of each
    lane's evaluation), `start` (segment starting at that iteration, -1 none), `end` (segment whose final
    sample that iteration produces, S = n * K none).
    """
    t, n, k = num_steps, branch_steps, branches
    seg = lambda i, b: i * k + b
    lanes = [[(i, b), (n - 1 - i, b)] for i in range(n // 2) for b in range(k)]
    if n % 2:
        m = n // 2
        lanes += [[(m, b), (m, b + 1)] if b + 1 < k else [(m, b)] for b in range(0, k, 2)]
    c = 2 * t - 1 - n
    sig_idx = np.full((c, len(lanes)), t - 1, np.int32)  # idle iterations evaluate a valid sigma, unused
    start = np.full((c, len(lanes)), -1, np.int32)
    end = np.full((c, len(lanes)), n * k, np.int32)
    for lane, segments in enumerate(lanes):
        pos = 0
        for i, b in segments:
            length = t - 1 - i
            sig_idx[pos:pos + length, lane] = np.arange(i + 1, t)
            start[pos, lane] = seg(i, b)
            end[pos + length - 1, lane] = seg(i, b)
            pos += length
        assert pos <= c
    return {"sig_idx": sig_idx, "start": start, "end": end}


def branched_rollout(velocity_fn: Callable, noise, sigmas, key, *, branch_steps: int, branches: int,
                     noise_level: float, lanes_per_call: int = 0, rows=None) -> BranchRollout:
    """TempFlow-GRPO's rollout (sd3_pipeline_with_logprob_perstep.py e66824e) with the trunk shared.

    velocity_fn(x [B, ...], sigma [B]) -> v is the sampling policy with its CFG (one call per batch of the B
    seeds; the branches are vmapped over it, `lanes_per_call` lanes at a time, 0 = all). noise [B, ...] is
    x_0; sigmas the schedule [T + 1]; key draws eps = normal(key, (n, K, B, ...)), eps[i, k] the noise of
    branch k at step i, or with `rows` ([B] int, each seed's index in the epoch's batch) each seed's own
    [n, K, ...] block `sampling.step_noise(key, (B, n, K, ...), rows)`, so that a seed's branches do not depend
    on which other seeds share the call (micro-batched rollouts equal whole ones). Seeds are independent
    otherwise: the trunk and the tails are per seed. One trunk scan (n evaluations) then one scan over the
    packed branch tails (`lane_plan`): compiled once whatever n.
    """
    sig = f32(sigmas)
    t = sig.shape[0] - 1
    n, k = int(branch_steps), int(branches)
    if not 1 <= n <= t - 1:
        raise ValueError(f"branch_steps={n} must be in [1, num_steps - 1 = {t - 1}] (the last step has no tail)")
    if k < 1:
        raise ValueError(f"branches must be >= 1, got {k}")
    x0 = f32(noise)
    batch, shape = x0.shape[0], x0.shape[1:]
    sig_max = sig[1]

    def trunk_step(x, i):
        v = velocity_fn(x, jnp.full((batch,), sig[i], jnp.float32)).astype(jnp.float32)
        return sampling.ode_step(x, v, sig[i], sig[i + 1]).x_next, (x, v)

    _, (xs, vs) = jax.lax.scan(trunk_step, x0, jnp.arange(n))  # [n, B, ...]

    # One SDE step per (step, branch) from the trunk state with the trunk's velocity, as flat rows.
    if rows is None:
        eps = jax.random.normal(key, (n, k, batch, *shape), jnp.float32)
    else:
        eps = jnp.moveaxis(sampling.step_noise(key, (batch, n, k, *shape), rows), 0, 2)
    flat = lambda a: jnp.broadcast_to(a[:, None], (n, k, *a.shape[1:])).reshape(n * k * batch, *a.shape[2:])
    row_sig = jnp.repeat(sig[:n], k * batch)
    row_next = jnp.repeat(sig[1:n + 1], k * batch)
    x_r, v_r = flat(xs), flat(vs)
    x_next = sampling.step("sde", x_r, v_r, row_sig, row_next, eps.reshape(n * k * batch, *shape),
                           level=noise_level, sig_max=sig_max).x_next
    log_probs = sampling.transition_log_prob("sde", x_r, x_next, v_r, row_sig, row_next, noise_level,
                                             sig_max=sig_max).log_prob
    starts = x_next.reshape(n * k, batch, *shape)

    plan = lane_plan(t, n, k)
    lanes = plan["sig_idx"].shape[1]
    vmapped = jax.vmap(velocity_fn)

    def lane_velocity(x, s):
        s_b = jnp.broadcast_to(s[:, None], (lanes, batch))
        if not lanes_per_call or lanes_per_call >= lanes:
            return vmapped(x, s_b)
        return jax.lax.map(lambda a: velocity_fn(*a), (x, s_b), batch_size=int(lanes_per_call))

    def tail_step(x, inp):
        sig_idx, start = inp
        begin = (start >= 0).reshape((lanes,) + (1,) * (x.ndim - 1))
        x = jnp.where(begin, starts[jnp.maximum(start, 0)], x)
        s, s_next = sig[sig_idx], sig[sig_idx + 1]
        v = lane_velocity(x, s).astype(jnp.float32)
        x = sampling.ode_step(x, v, s[:, None], s_next[:, None]).x_next
        return x, x

    # Every iteration's states come out of the scan (no scatter into a carried buffer, which XLA copies per
    # iteration); each segment's final sample is then picked at its static (iteration, lane).
    _, trace = jax.lax.scan(tail_step, jnp.zeros((lanes, batch, *shape), jnp.float32),
                            (jnp.asarray(plan["sig_idx"]), jnp.asarray(plan["start"])))
    it, lane = np.nonzero(plan["end"] < n * k)
    order = np.argsort(plan["end"][it, lane])
    finals = trace[it[order], lane[order]]  # [S, B, ...] in segment order
    split = lambda a: a.reshape(n, k, batch, *a.shape[2:]) if a.ndim > 1 else a.reshape(n, k, batch)
    return BranchRollout(xs, split(starts), split(log_probs.reshape(n * k, batch)), split(finals),
                         n + plan["sig_idx"].size)


def to_rows(a, branches: int | None = None) -> jax.Array:
    """[n, K, B, ...] -> rows [B * K * n, ...] in the order (seed, branch, step), batch-first. With `branches`,
    `a` is the trunk's [n, B, ...], shared by the K branches of each step."""
    if branches is not None:
        a = jnp.broadcast_to(a[:, None], (a.shape[0], branches, *a.shape[1:]))
    a = jnp.swapaxes(jnp.moveaxis(a, 2, 0), 1, 2)  # [B, K, n, ...]
    return a.reshape(-1, *a.shape[3:])


# ------------------------------------------------------------------------------------ the method


class TempFlowGRPO(Method):
    """TempFlow-GRPO, `config.method = "tempflow"` (Shredded-Pork/TempFlow-GRPO e66824e; see the module
    docstring). `train.group_size` is the number of seeds per prompt (4 in the published recipes), and each
    seed yields `branches` x n scored and trained rows."""

    name = "tempflow"
    metric_names = FlowGRPO.metric_names

    @staticmethod
    def defaults():
        return ml_collections.ConfigDict(dict(
            branches=6,  # K: SDE branches per (seed, branch step) (`exploration_k`, `num_samples` in the reference)
            noise_level=0.7,  # a of the SDE step (hard-coded 0.7 for SD3.5-M in the reference)
            guidance=4.5,  # CFG in the rollout (trunk and branches) and in the training forward
            clip_range=1e-4,
            beta=0.004,  # KL weight (0.001 PickScore)
            adv_clip=5.0,
            timestep_fraction=0.99,  # branch and trained steps: the first int(num_steps * fraction)
            filter_zero_advantage=True,  # leave out (seed, branch) units whose advantage is 0 on every step
            lanes_per_call=0,  # branch lanes per vmapped velocity call in the rollout (0 = all; less memory)
            eval_ema=dict(decay=0.9, every=8, cadence="microbatch"),
        ))

    @property
    def num_steps(self) -> int:
        return int(self.config.sample.num_steps)

    @property
    def branch_steps(self) -> int:
        return int(self.num_steps * self.cfg.timestep_fraction)

    def validate(self) -> None:
        c, t, n = self.cfg, self.config.train, self.num_steps
        if not c.noise_level > 0:
            raise ValueError(f"config.tempflow.noise_level must be > 0 (the branches' SDE step), got {c.noise_level}")
        if c.guidance < 1.0:
            raise ValueError(f"config.tempflow.guidance must be >= 1 (1 = no CFG), got {c.guidance}")
        if c.branches < 2:
            raise ValueError(f"config.tempflow.branches must be >= 2 (advantages compare a step's branches), "
                             f"got {c.branches}")
        if not 1 <= self.branch_steps <= n - 1:
            raise ValueError(f"config.tempflow.timestep_fraction={c.timestep_fraction} x sample.num_steps={n} gives "
                             f"{self.branch_steps} branch steps; it must be between 1 and num_steps - 1 = {n - 1} "
                             "(a branch needs at least one ODE step after its SDE step)")
        units = t.prompts_per_batch * t.group_size * c.branches
        if units % t.minibatches:
            raise ValueError(f"the {units} (seed, branch) units of an epoch ({t.prompts_per_batch} prompts x "
                             f"{t.group_size} seeds x {c.branches} branches) must divide into train.minibatches="
                             f"{t.minibatches}: a minibatch trains whole units (all their steps)")
        super().validate()

    # ---------------------------------------------------------------- rollouts

    def rollout_spec(self) -> RolloutSpec:
        c = self.cfg
        return RolloutSpec(kind="sde", noise_level=float(c.noise_level), guidance=float(c.guidance))

    def rows(self, batch: int) -> int:
        return batch * int(self.cfg.branches) * self.branch_steps

    def rollout(self, velocity_fn, noise, sigmas, key, window, rows=None):
        """The branched rollout of the call's B seeds -> B K n rows in the order (seed, branch, step).
        keep["source"] is each row's seed in this call; keep["group"] its (seed, step) group, numbered by the
        seed's row in the epoch's batch (`rows`, the trainer's; arange(B) without), so the groups of
        `sample.micro_batch` calls, concatenated, are those of one whole-batch call."""
        c = self.cfg
        out = branched_rollout(velocity_fn, noise, sigmas, key, branch_steps=self.branch_steps,
                               branches=int(c.branches), noise_level=float(c.noise_level),
                               lanes_per_call=int(c.lanes_per_call), rows=rows)
        n, k, b = out.log_probs.shape
        step = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None, None], (n, k, b))
        local = jnp.arange(b, dtype=jnp.int32)
        seed = jnp.broadcast_to(local[None, None, :], (n, k, b))
        row = jnp.broadcast_to((local if rows is None else jnp.asarray(rows, jnp.int32))[None, None, :], (n, k, b))
        keep = {"latents": to_rows(out.latents, k), "next_latents": to_rows(out.next_latents),
                "log_probs": to_rows(out.log_probs), "step": to_rows(step),
                "group": to_rows(row * n + step), "source": to_rows(seed)}
        return keep, to_rows(out.samples)

    # ---------------------------------------------------------------- advantages and minibatches

    def advantages(self, rewards, group_ids, num_groups, keep):
        """Per (seed, branch step) group over its K branches (`keep["group"]`); the trainer's prompt groups
        are not used."""
        a = self.config.get("advantage") or {}
        groups = rewards.shape[0] // int(self.cfg.branches)
        return adv_lib.group_advantages(rewards, keep["group"], num_groups=groups, std=a.get("std", "per_prompt"),
                                        eps=a.get("eps", 1e-4), ddof=a.get("ddof", 0), clip=None)

    def plan(self, advantages, key, minibatches):
        """Whole (seed, branch) units per minibatch, each unit's n rows contiguous in step order; Flow-GRPO's
        zero-advantage filter (`zero_advantage_plan`) on the units' [n] advantages."""
        n = self.branch_steps
        units = advantages.reshape(-1, n)
        if self.cfg.filter_zero_advantage:
            order, weights = zero_advantage_plan(units, key, minibatches)
        else:
            order = jax.random.permutation(key, units.shape[0]).astype(jnp.int32)
            weights = jnp.ones((units.shape[0],), jnp.float32)
        rows = (order[:, None] * n + jnp.arange(n, dtype=jnp.int32)).reshape(-1)
        return rows, jnp.repeat(weights, n)

    # ---------------------------------------------------------------- training

    def nfes(self, batch: int) -> dict[str, int]:
        c = self.cfg
        cfg = 2 if c.guidance != 1.0 else 1
        per_seed = self.branch_steps + lane_plan(self.num_steps, self.branch_steps, int(c.branches))["sig_idx"].size
        return {"rollout": per_seed * batch * cfg, "train": self.train_nfes(batch)}

    def train_nfes(self, batch: int) -> int:
        c = self.cfg
        return self.rows(batch) * (2 if c.guidance != 1.0 else 1) * (2 if c.beta > 0 else 1)

    def grads(self, ctx, params, state, mb, window, key):
        """The minibatch's rows scanned in n chunks (chunk j = rows j, j + n, j + 2n, ...: for a minibatch of
        whole units in step order, `plan`'s, the j-th row of every unit, m rows per forward, as the reference's
        micro-step j), each chunk's loss a weighted mean over its rows and the chunks combined by their weight
        sums, so the gradient is the weighted mean over all rows whatever the row order. Rows that do not fill
        the last chunk row (the trainer's zero-weight padding to the mesh, or a `train.micro_batch` part) are
        padded here with weight 0."""
        c = self.cfg
        level, beta, guidance, n = float(c.noise_level), float(c.beta), float(c.guidance), self.branch_steps
        sig_all = ctx.sigmas
        w_noise = noise_weights(sig_all, level, jnp.arange(n))
        rows = {k: mb[k] for k in ("latents", "next_latents", "log_probs", "step", "advantages", "weights")}
        cd = mb["cond"]  # the negative prompt's embeddings are stored once (the trainer's) or per row
        per_row = cd.neg_ctx.ndim == cd.ctx.ndim
        rows["cond"] = cd if per_row else (cd.ctx, cd.pooled)
        r = rows["weights"].shape[0]
        pad = -r % n
        if pad:  # repeat the first rows with weight 0
            rows = jax.tree.map(lambda a: jnp.concatenate([a, a[jnp.arange(pad) % r]]), rows)
            rows["weights"] = rows["weights"].at[r:].set(0.0)
        chunks = lambda a: jnp.swapaxes(a.reshape(-1, n, *a.shape[1:]), 0, 1)  # [m * n, ...] -> [n, m, ...]
        inputs = jax.tree.map(chunks, rows)

        def loss_fn(p, inp):
            x, x_next, idx = inp["latents"], inp["next_latents"], inp["step"]
            cond = inp["cond"] if per_row else Cond(*inp["cond"], cd.neg_ctx, cd.neg_pooled)
            sig, sig_next = sig_all[idx], sig_all[idx + 1]
            step = lambda q: sampling.transition_log_prob(
                "sde", x, x_next, velocity(ctx.apply, q, x, sig, cond, guidance), sig, sig_next, level,
                sig_max=sig_all[1])
            lp = step(p)
            ref_mean = jax.lax.stop_gradient(step(ctx.ref_params).mean) if beta > 0 else None
            # Clamp, then weight (the reference: clamp(A) and then -2.25 std_dev_t A ratio).
            adv = jnp.clip(f32(inp["advantages"]), -c.adv_clip, c.adv_clip) * w_noise[idx]
            return grpo_loss(lp.log_prob, inp["log_probs"], adv, clip_range=float(c.clip_range), beta=beta,
                             mean=lp.mean if beta > 0 else None, ref_mean=ref_mean,
                             std_t=lp.std if beta > 0 else None, adv_clip=None, kl_mode="std",
                             weights=inp["weights"])

        return accumulate(loss_fn, params, inputs, inputs["weights"].sum(axis=1))
