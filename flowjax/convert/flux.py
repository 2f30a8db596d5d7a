"""FLUX.1 transformer: the flowjax `Flux` <-> diffusers `FluxTransformer2DModel` (diffusers 0.42) key table."""

from __future__ import annotations

from flowjax.convert import mapping
from flowjax.convert.mapping import dense, norm_scale
from flowjax.models.flux import FluxConfig

CLASS_NAME = "FluxTransformer2DModel"


def _double_block_entries():
    b = "transformer_blocks.{i}"
    e = [*dense("norm1.linear", f"{b}.norm1.linear"), *dense("norm1_context.linear", f"{b}.norm1_context.linear")]
    for proj in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
        e += dense(f"attn.{proj}", f"{b}.attn.{proj}")
    e += dense("attn.to_out", f"{b}.attn.to_out.0")
    for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
        e += norm_scale(f"attn.{norm}", f"{b}.attn.{norm}")
    for ff in ("ff", "ff_context"):
        e += dense(f"{ff}.proj_in", f"{b}.{ff}.net.0.proj") + dense(f"{ff}.proj_out", f"{b}.{ff}.net.2")
    return e


def _single_block_entries():
    b = "single_transformer_blocks.{i}"
    e = [*dense("norm.linear", f"{b}.norm.linear"), *dense("proj_mlp", f"{b}.proj_mlp"),
         *dense("proj_out", f"{b}.proj_out")]
    for proj in ("to_q", "to_k", "to_v"):
        e += dense(f"attn.{proj}", f"{b}.attn.{proj}")
    for norm in ("norm_q", "norm_k"):
        e += norm_scale(f"attn.{norm}", f"{b}.attn.{norm}")
    return e


def flux_table(cfg: FluxConfig) -> list[mapping.KeyMap]:
    """The flowjax <-> diffusers key table of a FluxTransformer2DModel with this config."""
    t = "time_text_embed"
    top = [
        *dense("x_embedder", "x_embedder"),
        *dense("context_embedder", "context_embedder"),
        *dense("timestep_embedder.linear_1", f"{t}.timestep_embedder.linear_1"),
        *dense("timestep_embedder.linear_2", f"{t}.timestep_embedder.linear_2"),
        *dense("text_embedder.linear_1", f"{t}.text_embedder.linear_1"),
        *dense("text_embedder.linear_2", f"{t}.text_embedder.linear_2"),
        *dense("norm_out.linear", "norm_out.linear"),
        *dense("proj_out", "proj_out"),
    ]
    if cfg.guidance_embeds:
        top += dense("guidance_embedder.linear_1", f"{t}.guidance_embedder.linear_1")
        top += dense("guidance_embedder.linear_2", f"{t}.guidance_embedder.linear_2")
    stacks = []
    if cfg.num_layers:
        stacks.append(("double_blocks.blocks", range(cfg.num_layers), _double_block_entries()))
    if cfg.num_single_layers:
        stacks.append(("single_blocks.blocks", range(cfg.num_single_layers), _single_block_entries()))
    return mapping.build_table(top, stacks)
