"""RL on the shapes world: the shipped tiny text-to-image model learns to count, bind colours and place
objects, scored by the verifiable reward of flowjax.rewards.shapes. Runs on a laptop CPU.

  python -m flowjax.train --config=configs/shapes.py --workdir=runs/shapes              # DiffusionNFT (default)
  python -m flowjax.train --config=configs/shapes.py:grpo --workdir=runs/shapes_grpo    # Flow-GRPO
Variants: grpo (Flow-GRPO, SDE sampler), cps (coefficients-preserving sampler), mixgrpo (SDE window),
dance (DanceGRPO: its schedule and kernel, a random 60% of the steps per sample), awm (advantage weighted
matching), nft (DiffusionNFT), tempflow (TempFlow-GRPO: an ODE trunk per seed, 4 SDE branches at each of the
first 2 steps, each branch's reward that step's; 6 prompts x 2 seeds, 96 scored branches per epoch),
euphonium (Flow-GRPO's SDE rollouts guided by the gradient of the latent PRM shipped in
flowjax/assets/shapes_prm, dual-reward GRPO), gdro (GDRO online: ODE rollouts, the paper's k = 6 images per prompt), gdro_offline (GDRO
offline: a fixed dataset sampled once by the base model in WORKDIR/rollouts/). Evaluation is strict accuracy
on the held-out prompts with ODE sampling from fixed noise (`eval/accuracy` in metrics.jsonl), before the
first update and every `eval_every` steps; grids of the held-out samples go to samples/.
"""

import ml_collections

from flowjax import sharding
from flowjax.models.prm import SHAPES_PRM
from flowjax.rl.method import method_class

VARIANTS = ("grpo", "cps", "mixgrpo", "dance", "awm", "nft", "tempflow", "euphonium", "gdro", "gdro_offline")


def get_config(arg: str = "nft"):
    arg = arg or "nft"  # DiffusionNFT: the steadiest gain per minute here (README, "The shapes world")
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r}; choose one of {VARIANTS}")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.method = {"cps": "grpo", "mixgrpo": "grpo", "dance": "grpo", "gdro_offline": "gdro"}.get(arg, arg)
    c.variant = arg
    c.dtype = "float32"  # CPU: fp32 is faster than emulated bf16
    c.world = dict(name="shapes", base="")  # "" = the base model shipped in flowjax/assets/shapes_base

    # Full fine-tuning (rank 0): the base has 2.4M weights. LoRA r16 on the attention learned about half as
    # fast here and drifted sooner; set lora.rank=16 to train an adapter as on SD3.5.
    c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets=(
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")))

    s = c.sample = ml_collections.ConfigDict()
    s.num_steps = 8
    s.shift = 3.0  # as the base model was trained (configs/shapes_pretrain.py)
    s.latent_size = (36, 36)
    s.same_noise_per_group = False
    s.eval_num_steps = 16
    s.eval_guidance = 1.0
    s.num_eval_prompts = 0  # 0 = every held-out prompt
    s.eval_samples_per_prompt = 2

    t = c.train = ml_collections.ConfigDict()
    t.steps = 200
    t.prompts_per_batch = 6
    t.group_size = 8
    t.minibatches = 2
    t.grad_accum = 1
    # NFT rose steadily at a constant 1e-4. Flow-GRPO and AWM at 1e-4 peaked near step 50-100 and then fell
    # below the base, so they take half the rate, decayed to 0 over the run.
    t.lr = 1e-4 if c.method == "nft" else 5e-5
    t.lr_schedule = "constant" if c.method == "nft" else "cosine"
    t.weight_decay = 1e-4
    t.adam_b1, t.adam_b2, t.adam_eps = 0.9, 0.999, 1e-8
    t.max_grad_norm = 1.0
    t.max_nan_steps = 5
    c.advantage = dict(std="global", ddof=0, eps=1e-4)

    # KL to the base, far above the published SD3.5 values: without it (or with NFT/AWM at 0.01) runs here
    # peaked within 100-150 steps, then drifted into faint "ghost" objects, colour shifts and noise.
    c[c.method] = method_class(c.method).defaults()
    m = c[c.method]
    if c.method == "grpo":
        # CFG-free; a CPU budget of minutes: larger PPO steps than the published 1e-4; the first 60% of the steps.
        m.update(kind="cps" if arg == "cps" else "dance" if arg == "dance" else "sde", guidance=1.0,
                 clip_range=0.2, beta=0.04, timestep_fraction=0.6)
        m.noise_level = {"sde": 0.7, "cps": 0.8, "dance": 0.3}[m.kind]
        if arg == "mixgrpo":
            # MixGRPO's progressive window (Tencent-Hunyuan/MixGRPO e5cdd6a: 4 of 25 steps, one step later every 25
            # iterations, rolling back, never the last 2), scaled to 8 steps: 2 steps, one step later every 25
            # epochs, so the 200 epochs sweep it over steps 0-5 once.
            m.window.update(size=2, schedule="progressive", shift_interval=25, stride=1, roll_back=True)
        if arg == "dance":  # DanceGRPO: its schedule, a random 60% of the steps per sample, unbiased group std
            m.update(schedule="dance", random_steps=True, beta=0.0, integer_timesteps=True)
            c.advantage = dict(std="per_prompt", ddof=1, eps=1e-8)
    elif c.method == "tempflow":
        # An epoch's cost near Flow-GRPO's here (768 NFEs: 48 samples x 8 steps + 4 trained steps x 48 x 2):
        # 6 prompts x 2 seeds, K = 4 branches at the first 2 steps cost 12 x (2 + 4 x (7 + 6)) = 648 rollout and
        # 96 rows x 2 = 192 training evaluations (840). CFG-free, clip 0.2 and KL 0.04 as Flow-GRPO's variant.
        t.group_size = 2  # seeds per prompt
        m.update(branches=4, guidance=1.0, clip_range=0.2, beta=0.04, timestep_fraction=0.25)
        c.advantage = dict(std="per_prompt", ddof=0, eps=1e-4)  # per (seed, step) group
    elif c.method == "euphonium":
        # Euphonium's additions (guidance by the latent PRM shipped in flowjax/assets/shapes_prm on the last half
        # of the steps, the process advantages of its scores) on the Flow-GRPO shapes variant's kernel and settings
        # (SDE at 0.7, KL 0.04, clip 0.2, the first 60% of the steps, EMA evaluation copy): its published
        # DanceGRPO kernel (eta 0.3 as the dance variant, no KL) drifted here, held-out accuracy gain over seeds
        # 0-2 at 100 epochs -0.045 +- 0.036 (with KL 0.04, seed 0: -0.037); with this kernel +0.084 +- 0.026.
        # Guidance scale 0.9 x (sigma_i - sigma_{i+1}): the earlier eta^2 / (2 kl_beta) = 0.3^2 / 0.1, kept fixed
        # so the guidance does not grow with the SDE's larger noise level. The shipped PRM (python -m flowjax.prm
        # --rollouts=1536 --steps=800 --batch_size=128 --lr=2e-3; its config.json holds the fit) is weak: held-out
        # Pearson r 0.27 overall, 0.03-0.12 within a prompt's group on the guided steps.
        m.update(kind="sde", noise_level=0.7, schedule="sd3", integer_timesteps=False, random_steps=False,
                 filter_zero_advantage=True, guidance=1.0, clip_range=0.2, beta=0.04, timestep_fraction=0.6)
        m.eval_ema.decay = 0.9
        m.guide.update(source="prm", path=str(SHAPES_PRM), start=4, scale=0.9)
        c.advantage = dict(std="per_prompt", ddof=1, eps=1e-8)
    elif c.method == "awm":
        # |A| clipped to 1 then scaled by 5 (adv_scale 1, advantage_max 5): the shapes recipe, not the published one.
        m.update(num_train_timesteps=4, beta=0.3, adv_scale=1.0, adv_clip=5.0)
    elif c.method == "gdro":
        # The paper's k = 6, tau 0.05 and GenEval's beta 6 / gamma 1.0; 8 prompts x 6 = the other variants' 48 images.
        # beta_T 100 (not Diffusion-DPO's 1000): the pixel-space errors here are far larger than SD3.5's latent ones.
        # Held-out accuracy gains measured over 100 steps, seed 0 (lr 5e-5 cosine unless said): 4 draws with one loss
        # per draw ("outside"): beta_T 1000 +0.006, beta_T 10 at lr 1e-4 +0.037, beta_T 1 (the formula literally)
        # at lr 1e-4 collapsed to 0.10; 4 draws averaged in the implicit reward, beta_T 10 at lr 1e-4: +0.012;
        # 8 draws averaged, beta_T 100: +0.037, its implicit rewards ordering 65-70 % of the pairs by step 100.
        t.prompts_per_batch, t.group_size = 8, 6
        m.update(guidance=1.0, beta_T=100.0, timesteps="schedule", num_train_timesteps=8,
                 offline=arg == "gdro_offline", offline_batches=25)
    else:
        m.update(kl_beta=0.3)

    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.sharding_rules = sharding.DEFAULT_RULES
    c.eval_every = 50
    c.checkpoint_every = 100
    c.keep_checkpoints = 2
    c.grid_size = 32  # held-out samples drawn in samples/step_*.png
    c.tensorboard = True
    return c
