"""A toy conditioning world for exercising the RL loop on any MMDiT without text encoders or a VAE.

Each of `num_prompts` prompts has a fixed random text embedding ([L, joint_dim] + pooled) and a target
colour per latent channel; the jittable reward is how close a sample's per-channel mean is to its
prompt's target (in (0, 1], 1 = exact). It is the cheapest reward with a real, prompt-dependent
optimum: a policy only gains by learning to read its conditioning.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ToyWorld:
    num_prompts: int
    text_len: int
    joint_dim: int
    pooled_dim: int
    channels: int
    seed: int = 0
    target_scale: float = 1.0

    def _tables(self):
        k_ctx, k_pool, k_target = jax.random.split(jax.random.key(self.seed), 3)
        ctx = jax.random.normal(k_ctx, (self.num_prompts, self.text_len, self.joint_dim))
        pooled = jax.random.normal(k_pool, (self.num_prompts, self.pooled_dim))
        target = self.target_scale * jax.random.normal(k_target, (self.num_prompts, self.channels))
        return ctx, pooled, target

    @property
    def cond_shapes(self):
        """([L, D], [P]): the conditioning shapes of one row (for flowjax.plan)."""
        return (self.text_len, self.joint_dim), (self.pooled_dim,)

    def encode(self, prompt_ids):
        """(text [B, L, joint_dim], pooled [B, pooled_dim]) of integer prompt ids."""
        ctx, pooled, _ = self._tables()
        return ctx[prompt_ids], pooled[prompt_ids]

    def negative(self, batch: int):
        """The unconditional embedding used for classifier-free guidance (zeros, like an empty prompt)."""
        return jnp.zeros((batch, self.text_len, self.joint_dim)), jnp.zeros((batch, self.pooled_dim))

    def reward(self, samples, prompt_ids):
        """exp(-||channel means - target||^2 / C) per sample, [B] in (0, 1]."""
        _, _, target = self._tables()
        means = samples.astype(jnp.float32).mean(axis=(1, 2))
        return jnp.exp(-jnp.square(means - target[prompt_ids]).mean(-1))

    def score(self, samples, prompt_ids, state=None):
        """{"reward": [B]} (the world interface of flowjax.worlds); the toy world has no weights."""
        del state
        return {"reward": self.reward(samples, prompt_ids)}
