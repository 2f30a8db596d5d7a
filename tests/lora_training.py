"""A few training steps on a model's LoRA adapters, for the LoRA export tests: flow matching on fixed data, so the
adapters move away from their no-op initialisation in a way that depends on the whole forward pass."""

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def train_adapters(model, x0, *conditioning, steps: int = 3, learning_rate: float = 3e-2) -> None:
    """`steps` Adam steps on the model's `nnx.LoRAParam`s (in place) of the flow-matching loss
    mean((v(x_t, 1000 sigma, *conditioning) - (eps - x0))^2), x_t = (1 - sigma) x0 + sigma eps."""
    graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)
    batch = x0.shape[0]

    def loss_fn(p, key):
        k1, k2 = jax.random.split(key)
        sigma = jax.random.uniform(k1, (batch,))
        eps = jax.random.normal(k2, x0.shape)
        s = sigma[:, None, None, None]
        v = nnx.merge(graphdef, p, rest)((1 - s) * x0 + s * eps, sigma * 1000, *conditioning)
        return jnp.mean((v - (eps - x0)) ** 2)

    opt = optax.adam(learning_rate)

    @jax.jit
    def step(p, state, key):
        grads = jax.grad(loss_fn)(p, key)
        updates, state = opt.update(grads, state, p)
        return optax.apply_updates(p, updates), state

    state = opt.init(params)
    for i in range(steps):
        params, state = step(params, state, jax.random.key(i))
    nnx.update(model, params)
