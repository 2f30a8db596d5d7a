"""The toy world: a tiny random MMDiT learns to steer each prompt's sample colour (no weights needed).

  python -m flowjax.train --config=configs/toy.py:grpo --workdir=runs/toy
Variants: grpo (Flow-GRPO, sde), cps, mixgrpo (SDE window), dance, awm, nft, tempflow (TempFlow-GRPO: 4 prompts
x 2 seeds, 4 branches at each of the first 3 steps), euphonium (DanceGRPO rollouts guided by the gradient of
the toy reward itself, dual-reward GRPO), gdro (GDRO online: ODE rollouts), gdro_offline (GDRO's offline mode:
4 batches sampled once by the reference model, then trained on). It exercises the whole RL core (sampling,
advantages, losses, LoRA, sharding, checkpoints) in seconds per step on a CPU.
"""

import ml_collections

from flowjax import sharding
from flowjax.rl.method import method_class

VARIANTS = ("grpo", "cps", "mixgrpo", "dance", "awm", "nft", "tempflow", "euphonium", "gdro", "gdro_offline")


def get_config(arg: str = "grpo"):
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r}; choose one of {VARIANTS}")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.method = {"cps": "grpo", "mixgrpo": "grpo", "dance": "grpo", "gdro_offline": "gdro"}.get(arg, arg)
    c.variant = arg

    c.arch = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                   num_attention_heads=2, joint_attention_dim=8, caption_projection_dim=16,
                   pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8,
                   dual_attention_layers=(0,), qk_norm="rms_norm")
    c.model = dict(remat="none", attention="xla")  # the transformer's memory options
    c.dtype = "float32"
    c.world = dict(num_prompts=8, text_len=4, target_scale=0.7)

    c.lora = ml_collections.ConfigDict(dict(rank=4, alpha=8.0, targets=(
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")))

    s = c.sample = ml_collections.ConfigDict()
    s.num_steps = 6
    s.shift = 3.0
    s.latent_size = (8, 8)
    s.same_noise_per_group = False
    s.eval_num_steps = 12
    s.eval_guidance = 1.0 if arg == "nft" else 2.0
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
    t.max_nan_steps = 5
    c.advantage = dict(std="global", ddof=0, eps=1e-4)

    # Toy: larger PPO steps than the published 1e-4 clip, no KL, to move in a few dozen updates.
    c[c.method] = method_class(c.method).defaults()
    m = c[c.method]
    if c.method == "grpo":
        m.update(kind={"cps": "cps", "dance": "dance"}.get(arg, "sde"), guidance=2.0, clip_range=0.2, beta=0.0,
                 timestep_fraction=0.9, filter_zero_advantage=True)
        m.noise_level = {"sde": 0.7, "cps": 0.8, "dance": 0.3}[m.kind]
        if arg == "mixgrpo":
            m.window.update(size=2, schedule="random", range=(0, 5))
        if arg == "dance":  # DanceGRPO: its schedule, a random 60% of the steps per sample, unbiased group std
            m.update(schedule="dance", random_steps=True, timestep_fraction=0.6, integer_timesteps=True)
            c.advantage = dict(std="per_prompt", ddof=1, eps=1e-8)
    elif c.method == "tempflow":  # group_size = seeds per prompt; each seed gives 4 x 3 scored branches
        t.group_size = 2
        m.update(branches=4, guidance=2.0, clip_range=0.2, beta=0.0, timestep_fraction=0.5)
        c.advantage = dict(std="per_prompt", ddof=0, eps=1e-4)
    elif c.method == "euphonium":
        # DanceGRPO's settings above, guided on the last 3 of the 6 steps by the toy reward's own gradient at the
        # x0 prediction (it is differentiable); a stronger tilt than the published kl_beta 3.125, whose c_i would
        # barely move a reward in (0, 1] over 6 steps.
        m.update(guidance=2.0, clip_range=0.2, noise_level=0.3, integer_timesteps=True)
        m.guide.update(source="reward", start=3, kl_beta=0.05)
        c.advantage = dict(std="per_prompt", ddof=1, eps=1e-8)
    elif c.method == "awm":
        m.update(guidance=2.0, beta=0.0, ema_beta=0.0, adv_clip=None, num_train_timesteps=3, rows_per_draw=0)
    elif c.method == "gdro":
        m.update(guidance=2.0, offline=arg == "gdro_offline", offline_batches=4)
    else:  # Euler rollouts: on a 6-step grid (shift 3) the reference's dpm2 overshoots its last step
        m.update(kl_beta=0.0, solver="ode")

    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.sharding_rules = sharding.DEFAULT_RULES  # logical axis -> mesh axes (pure FSDP)
    c.eval_every = 10
    c.checkpoint_every = 10
    c.keep_checkpoints = 2
    c.tensorboard = True  # events under WORKDIR/tensorboard beside metrics.jsonl
    return c
