"""LoRA adapters on chosen `Dense` projections, with PEFT's scale alpha / rank, merge and unmerge.

Adapters are `nnx.LoRAParam`s (a `Param` subclass), so `nnx.state(model, nnx.LoRAParam)` is the
trainable state and `BASE` filters the frozen rest. Inside scanned stacks the adapter has the same
leading `layers` axis as the kernel. Setting `lora_b` to zero switches an adapter off exactly, which
is how the reference policy is evaluated from the same base weights.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from flowjax.models.layers import Dense

# Flow-GRPO / AWM / DiffusionNFT on SD3.5: the joint attention's projections (PEFT names).
SD3_ATTENTION_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)
# FLUX.1: the same PEFT names. PEFT matches a target as a dotted suffix, so `attn.to_q/k/v` adapt the q, k, v
# projections of the double-stream blocks (`transformer_blocks.i.attn`) and of the single-stream blocks
# (`single_transformer_blocks.i.attn`, which have no to_out: their `proj_out` also mixes in the MLP), the other
# five the double-stream blocks' image / text projections; flowjax matches the same way.
FLUX_ATTENTION_TARGETS = SD3_ATTENTION_TARGETS
# Flow-GRPO's FLUX LoRA (scripts/train_flux.py, as in IamCreateAI/FlowCPS b402c7a): the attention and both streams'
# feed-forward layers, rank 64, alpha 128.
FLUX_FLOW_GRPO_TARGETS = SD3_ATTENTION_TARGETS + ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                                                  "ff_context.net.2")
BASE = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 32
    alpha: float = 64.0
    targets: tuple[str, ...] = SD3_ATTENTION_TARGETS
    init_std: float | None = None  # A ~ N(0, init_std^2); None = 1/rank (PEFT's "gaussian" init)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _module_name(path: Sequence) -> str:
    """Dotted module path with scanned-stack plumbing dropped: `stacks.0.blocks.attn.to_q` -> `attn.to_q`."""
    parts = [str(p) for p in path]
    if "blocks" in parts:
        parts = parts[parts.index("blocks") + 1 :]
    return ".".join(parts)


def _normalise(target: str) -> str:
    """A diffusers / PEFT module name in flowjax's names: diffusers keeps the attention output projection in a
    ModuleList (`to_out.0`, ours `to_out`) and a FeedForward's projections in `net` (`ff.net.0.proj` and
    `ff.net.2`, ours `ff.proj_in` and `ff.proj_out`)."""
    target = re.sub(r"(^|\.)to_out\.0$", r"\1to_out", target)
    target = re.sub(r"(^|\.)net\.0\.proj$", r"\1proj_in", target)
    return re.sub(r"(^|\.)net\.2$", r"\1proj_out", target)


def _matches(name: str, targets: Iterable[str]) -> bool:
    # PEFT semantics: a target names a module by its full name or a dotted suffix of it.
    return any(name == t or name.endswith("." + t) for t in map(_normalise, targets))


def dense_modules(model: nnx.Module):
    for path, module in nnx.iter_graph(model):
        if isinstance(module, Dense):
            yield path, module


def apply(model: nnx.Module, config: LoRAConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32) -> list[str]:
    """Attaches fresh adapters (A Gaussian, B zero: the model is unchanged) to every target; in place.

    Returns the adapted module paths; raises if no module matches a target, so a typo cannot
    silently train nothing.
    """
    if config.rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {config.rank}")
    adapted, hit = [], set()
    for path, dense in dense_modules(model):
        name = _module_name(path)
        targets = [t for t in config.targets if _matches(name, [t])]
        if not targets:
            continue
        hit.update(targets)
        if dense.lora_a is not None:
            raise ValueError(f"{'.'.join(map(str, path))} already has a LoRA adapter")
        lead = dense.kernel.shape[:-2]  # the `layers` axis inside scanned stacks
        axes = dense.kernel.get_metadata().get("logical_axes") or (None,) * dense.kernel.ndim
        std = config.init_std if config.init_std is not None else 1.0 / config.rank
        a = std * jax.random.normal(rngs.params(), (*lead, dense.in_features, config.rank), param_dtype)
        dense.lora_a = nnx.LoRAParam(a, logical_axes=(*axes[:-1], None))
        dense.lora_b = nnx.LoRAParam(
            jnp.zeros((*lead, config.rank, dense.out_features), param_dtype), logical_axes=(*axes[:-2], None, axes[-1])
        )
        dense.lora_scale = config.scale
        adapted.append(".".join(map(str, path)))
    missing = sorted(set(config.targets) - hit)
    if missing:
        raise ValueError(f"LoRA targets {missing} match no projection of the model")
    return adapted


def delta(dense: Dense) -> jax.Array:
    """scale * A @ B in the kernel's layout (stacked layers included)."""
    a, b = dense.lora_a[...].astype(jnp.float32), dense.lora_b[...].astype(jnp.float32)
    return dense.lora_scale * jnp.einsum("...ir,...ro->...io", a, b)


def merge(model: nnx.Module) -> None:
    """Folds every adapter into its kernel (W += scale*A@B); the adapters stay for `unmerge`."""
    for _, dense in dense_modules(model):
        if dense.lora_a is not None and not dense.lora_merged:
            dense.kernel[...] = (dense.kernel[...].astype(jnp.float32) + delta(dense)).astype(dense.kernel.dtype)
            dense.lora_merged = True


def unmerge(model: nnx.Module) -> None:
    """Undoes `merge` (W -= scale*A@B) so the adapters train again."""
    for _, dense in dense_modules(model):
        if dense.lora_a is not None and dense.lora_merged:
            dense.kernel[...] = (dense.kernel[...].astype(jnp.float32) - delta(dense)).astype(dense.kernel.dtype)
            dense.lora_merged = False


def disabled(lora_state: nnx.State) -> nnx.State:
    """The LoRA state zeroed: merged with the base it computes the base model exactly (the reference)."""
    return jax.tree.map(lambda x: jnp.zeros_like(x), lora_state)


def merged_state(model: nnx.Module) -> nnx.State:
    """Every non-adapter variable, with active adapters folded into their kernels (for export)."""
    state = nnx.state(model, nnx.Not(nnx.LoRAParam))
    flat = dict(nnx.to_flat_state(state))
    for path, dense in dense_modules(model):
        if dense.lora_a is not None and not dense.lora_merged:
            var = flat[(*path, "kernel")]
            flat[(*path, "kernel")] = var.replace((var[...].astype(jnp.float32) + delta(dense)).astype(var.dtype))
    return nnx.from_flat_state(list(flat.items()))


def count(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
