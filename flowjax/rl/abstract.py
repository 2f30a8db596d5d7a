"""The trainer's programs from shapes alone, for ahead-of-time compilation on any mesh (`flowjax.plan`).

A `Trainer(..., abstract=True)` holds every state as a `jax.ShapeDtypeStruct` with its sharding; these functions
build those states and trace its jitted programs for abstract arguments, one call each as `train_step` and
`evaluate` make them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flowjax import sharding as sharding_lib
from flowjax.rl.method import Cond

def placed(state, mesh, rules):
    """An abstract NNX state with each leaf a ShapeDtypeStruct carrying its NamedSharding."""
    shardings = sharding_lib.variable_shardings(state, mesh, rules)
    return jax.tree.map(lambda v, sh: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh), state, shardings)


def abstract_state(trainer, params):
    """The trainer's TrainState as shapes and shardings: the optimizer state as the compiler places it for
    these params, the method's policies and the EMA copy like the params, counters and key replicated."""
    from flowjax.rl.trainer import TrainState

    sharded_like_params = lambda tree: jax.tree.map(
        lambda x, p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=p.sharding), tree, params)
    init = jax.jit(trainer.optimizer.init).lower(params).compile()
    on_mesh = lambda sh: sh if set(sh.device_set) == set(trainer.mesh.devices.flat) else trainer.replicated
    opt_state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_mesh(sh)),
                             jax.eval_shape(trainer.optimizer.init, params), init.output_shardings)
    method_state = jax.eval_shape(trainer.method.init_state, params)
    method_state = jax.tree.map(sharded_like_params, method_state,
                                is_leaf=lambda x: jax.tree.structure(x) == jax.tree.structure(params))
    scalar = lambda dtype, shape=(): jax.ShapeDtypeStruct(shape, dtype, sharding=trainer.replicated)
    return TrainState(step=scalar(jnp.int32), opt_step=scalar(jnp.int32), params=params, opt_state=opt_state,
                      method=method_state, ema=params if trainer.ema_spec else None,
                      key=scalar(jnp.uint32, (2,)), nan_steps=scalar(jnp.int32))


def program_args(trainer, micro_rows: int | None = None, minibatch_rows: int | None = None) -> dict:
    """Abstract arguments of each program ({"rollout", "reward", "update", "evaluate"} -> tuple): `micro_rows`
    rows per rollout / reward / evaluation call (default: the config's), `minibatch_rows` rows per update call
    (default: the config's padded minibatch)."""
    tr = trainer
    rows = micro_rows or tr.micro_rows or tr.batch_size
    batch = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=tr.batch_sharding)
    rep = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=tr.replicated)
    ctx_shape, pooled_shape = tr.world.cond_shapes
    cond = lambda n: Cond(batch((n, *ctx_shape), tr.compute_dtype), batch((n, *pooled_shape), tr.compute_dtype),
                          rep(ctx_shape, tr.compute_dtype), rep(pooled_shape, tr.compute_dtype))
    ids, key = batch((rows,), jnp.int32), rep((2,), jnp.uint32)
    window = jax.eval_shape(lambda: tr.method.window(0, jax.random.PRNGKey(0)))
    window = rep(window.shape, window.dtype)
    sampler = tr.method.rollout_spec().sampler
    sample_params = tr.state.params if sampler == "policy" else tr.state.method[sampler]
    args = {"rollout": (sample_params, tr.frozen, cond(rows), ids, ids, key, key, window, ids, tr.guide_state)}
    keep, samples = jax.eval_shape(tr._rollout, *args["rollout"])
    keep.pop("source", None)
    scored = samples.shape[0]
    args["reward"] = (batch(samples.shape, samples.dtype), batch((scored,), jnp.int32), getattr(tr.world, "state", None))
    # Advantages as the method makes them ([B], or per step [B, T]).
    scores = jax.eval_shape(tr._score, *args["reward"])
    adv = jax.eval_shape(tr._advantages, scores, batch((scored,), jnp.int32), keep)[0]
    m = minibatch_rows or tr.minibatch_rows
    mb = {k: batch((m, *v.shape[1:]), v.dtype) for k, v in keep.items()}
    mb.update(cond=cond(m), advantages=batch((m, *adv.shape[1:]), adv.dtype), weights=batch((m,), jnp.float32),
              pos=batch((m,), jnp.int32))
    acc = (tr.state.params, rep((), jnp.int32), rep((), jnp.int32))
    args["update"] = (tr.state, acc, tr.frozen, tr.ref_params, mb, window, key)
    args["evaluate"] = (tr.state.params, tr.frozen, cond(rows), ids, key)
    return args


def programs(trainer) -> dict:
    """The trainer's jitted programs by name, called with `program_args`' arguments."""
    return {"rollout": trainer._rollout, "reward": trainer._score, "update": trainer._update,
            "evaluate": trainer._evaluate}


def trace(trainer, name: str, args: tuple):
    """Program `name` traced for its abstract arguments (`jax.stages.Traced`): its `.jaxpr` and its `.lower()`
    come from this one trace."""
    return programs(trainer)[name].trace(*args)
