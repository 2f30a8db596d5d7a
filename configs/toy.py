"""The toy world: a tiny random MMDiT learns to steer each prompt's sample colour (no weights needed).

  python -m flowjax.train --config=configs/toy.py:grpo --workdir=runs/toy
Variants: grpo (Flow-GRPO, sde), cps, mixgrpo (SDE window), dance, awm, nft. It exercises the whole
RL core (sampling, advantages, losses, LoRA, sharding, checkpoints) in seconds per step on a CPU.
"""

import ml_collections

from flowjax import sharding

VARIANTS = ("grpo", "cps", "mixgrpo", "dance", "awm", "nft")


def get_config(arg: str = "grpo"):
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r}; choose one of {VARIANTS}")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.method = {"cps": "grpo", "mixgrpo": "grpo", "dance": "grpo"}.get(arg, arg)

    c.model = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                   num_attention_heads=2, joint_attention_dim=8, caption_projection_dim=16,
                   pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8,
                   dual_attention_layers=(0,), qk_norm="rms_norm")
    c.dtype = "float32"
    c.world = dict(num_prompts=8, text_len=4, target_scale=0.7)

    c.lora = ml_collections.ConfigDict(dict(rank=4, alpha=8.0, targets=(
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")))

    s = c.sample = ml_collections.ConfigDict()
    s.num_steps = 6
    s.shift = 3.0
    s.kind = {"cps": "cps", "dance": "dance", "awm": "ode", "nft": "ode"}.get(arg, "sde")
    s.noise_level = {"sde": 0.7, "cps": 0.8, "dance": 0.3, "ode": 0.0}[s.kind]
    s.guidance = 1.0 if arg == "nft" else 2.0
    s.window_size = 2 if arg == "mixgrpo" else 0
    s.latent_size = (8, 8)
    s.same_noise_per_group = False
    s.eval_num_steps = 12
    s.eval_guidance = s.guidance
    s.num_eval_prompts = 8

    t = c.train = ml_collections.ConfigDict()
    t.steps = 30
    t.prompts_per_batch = 4
    t.group_size = 4
    t.minibatches = 2
    t.grad_accum = 1
    t.lr = 3e-3
    t.weight_decay = 1e-4
    t.adam_b1, t.adam_b2, t.adam_eps = 0.9, 0.999, 1e-8
    t.max_grad_norm = 1.0
    t.timestep_fraction = 0.9 if c.method != "nft" else 0.99
    t.clip_range = 0.2  # toy: larger steps than the published 1e-4, to move in a few dozen updates
    t.beta = 0.0
    t.adv_std = "global"
    t.adv_clip = 5.0
    t.max_nan_steps = 5
    t.awm_p, t.awm_num_train_timesteps, t.awm_ema_beta, t.awm_adv_scale = 0.25, 3, 0.0, 5.0
    t.awm_ema_max_decay, t.awm_ema_rate = 0.3, 1e-3
    t.nft_mix, t.nft_kl_beta, t.nft_decay_type = 1.0, 0.0, 1

    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.sharding_rules = sharding.DEFAULT_RULES  # logical axis -> mesh axes (pure FSDP)
    c.eval_every = 10
    c.checkpoint_every = 10
    c.keep_checkpoints = 2
    return c
