"""Host data into global arrays: on every process, only that process's rows of a global batch (multi-host)."""

from __future__ import annotations

import jax
import numpy as np

from flowjax.rl.method import Cond


def local_rows(host_array):
    """This process's rows of a global batch (the batch split evenly over the processes)."""
    n, p = len(host_array), jax.process_count()
    return host_array[jax.process_index() * (n // p):(jax.process_index() + 1) * (n // p)]


def global_rows(host_array, sharding) -> jax.Array:
    """A global array sharded over the batch axis from this process's rows of the global batch."""
    return jax.make_array_from_process_local_data(sharding, np.asarray(local_rows(host_array)), host_array.shape)


def conditioning(world, prompt_ids, batch_sharding, replicated, dtype) -> Cond:
    """Conditioning of a global batch of prompts: each process encodes only its own rows, in the model's
    compute dtype; the negative prompt's embedding is kept once, replicated, and broadcast on device."""
    ids = np.asarray(prompt_ids)
    ctx, pooled = world.encode(local_rows(ids))
    neg_ctx, neg_pooled = world.negative(1)
    glob = lambda a: jax.make_array_from_process_local_data(
        batch_sharding, np.asarray(a).astype(dtype), (len(ids), *np.shape(a)[1:]))
    once = lambda a: jax.device_put(np.asarray(a)[0].astype(dtype), replicated)
    return Cond(glob(ctx), glob(pooled), once(neg_ctx), once(neg_pooled))
