"""The optimizer of a training run: gradient-norm clipping then AdamW (the references' torch.optim.AdamW with
clip_grad_norm_), at a constant or cosine-decayed learning rate, all from `config.train`."""

from __future__ import annotations

import optax

LR_SCHEDULES = ("constant", "cosine")


def check(train) -> None:
    if train.get("lr_schedule", "constant") not in LR_SCHEDULES:
        raise ValueError(f"train.lr_schedule must be one of {LR_SCHEDULES}, got {train.lr_schedule!r}")


def learning_rate(train):
    """`train.lr`, constant (the references) or, with `train.lr_schedule="cosine"`, decayed to 0 over the
    run's optimizer updates (steps x minibatches / grad_accum): a short run then ends where its
    updates are small instead of mid-stride."""
    if train.get("lr_schedule", "constant") == "constant":
        return train.lr
    updates = max(1, train.steps * train.minibatches // train.grad_accum)
    return optax.cosine_decay_schedule(train.lr, updates)


def optimizer(train) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(train.max_grad_norm),
        optax.adamw(learning_rate(train), b1=train.adam_b1, b2=train.adam_b2, eps=train.adam_eps,
                    weight_decay=train.weight_decay),
    )
