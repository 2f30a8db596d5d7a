"""The published SD3.5-Medium RL settings shared by configs/geneval.py, ocr.py and pickscore.py.

`sd35_medium(variant, task)` builds everything but the prompts and the reward, which each config file adds.
Batch sizes are the references' per-epoch batches on 32 GPUs; a flowjax minibatch is the references'
micro-batch i taken over all GPUs together (so `train.minibatches` = their `num_batches_per_epoch` x
`sample.train_batch_size / train.batch_size`, and `train.grad_accum` their gradient_accumulation_steps).

Sources (each value below cites one of these):
- Flow-GRPO: yifan123/flow_grpo ac4c86e `config/grpo.py:{geneval,general_ocr,pickscore}_sd3`, `config/base.py`
  (32 GPUs x 9 images x 4 micro-batches = 48 prompts x 24; 2 optimizer steps per epoch; EMA eval copy 0.9
  every 8 in `scripts/train_sd3.py`; eval and save every 60 epochs).
- Flow-CPS: IamCreateAI/FlowCPS b402c7a (sampler commit 814c359) `config/grpo.py`, `config/base.py`: Flow-GRPO's
  recipe with the cps kernel at noise level 0.7 and the undivided KL.
- flow_grpo's fast CFG-free CPS recipes: `config/grpo.py:{geneval,pickscore}_sd3_fast_nocfg` with
  `scripts/train_sd3_fast.py` (yifan123/flow_grpo 74db691): cps at 0.8, no CFG anywhere, clip 1e-5, no KL,
  a 3-step SDE window starting in [0, 2] (sde_window_range (0, 5)), only the window trained.
- AWM: scxue/advantage_weighted_matching be51372 `config/dgx_awm.py:{geneval,ocr,pickscore}_sd3_no_cfg_4nodes`.
- DiffusionNFT: NVlabs/DiffusionNFT 24af555 `config/nft.py:sd3_{geneval,ocr,pickscore}`, `config/base.py`.
- TempFlow-GRPO: Shredded-Pork/TempFlow-GRPO `config/dgx.py:{geneval,pickscore}_sd3_pr` (63e4def) with
  `scripts/train_sd3_pr.py` (e66824e): 8 GPUs x 1 seed x 4 sampling batches = 8 prompts x 4 seeds per epoch,
  K = 6 branches (`exploration_k`) at each of the first 9 of 10 steps, minibatches of 6 (seed, branch) units
  per GPU, 2 optimizer steps per epoch, per-group std (global_std=False), EMA 0.9 every 8, evaluation every 20
  epochs. Its config/base.py is not on record; lr, Adam, clip range 1e-4 and adv_clip_max 5 are Flow-GRPO's
  base.py, which TempFlow-GRPO forks. No OCR recipe is published (general_ocr_sd3 has no `_pr` form), so ocr
  has no tempflow variant.
- Euphonium: zerzerzerz/Euphonium d9f2c39 publishes one recipe, for HunyuanVideo (scripts/train_grpo_hunyuan.sh);
  there are no published image settings. Kept from it: 16 DanceGRPO steps with eta 0.25, guidance on the last 4
  with c_i = eta^2 / (2 * 3.125) * delta_t, log-probs under the unguided mean, a random 60% of the steps trained,
  outcome and process PPO terms of weight 1, clip 1e-4, advantages clipped to 5, per-group unbiased std + 1e-8,
  no KL. Chosen for SD3.5-M (our choice, not published): SD3.5's shift 3 (the script's 5 is HunyuanVideo's), CFG
  4.5 in rollouts, training and evaluation (Flow-GRPO's SD3.5 value; the script runs guidance-distilled
  HunyuanVideo without CFG), the shared LoRA / AdamW settings and Flow-GRPO's batch of 48 prompts x 24 in 4
  minibatches with 2 optimizer steps per epoch (the script: 8 videos per prompt, lr 1e-6 full fine-tuning).
  The guide: PickScore is differentiable, so on PickScore the world's reward of the x0 prediction guides
  (through the VAE decoder); GenEval (a host server) and OCR (edit distance) are not, so there the guide is a
  latent PRM that must first be trained for SD3.5 with `python -m flowjax.prm` (`euphonium.guide.path`).
- GDRO: the paper (arXiv 2601.02036v1; no public code), which reports OCR and GenEval (no PickScore, so no
  PickScore variant): k = 6 images per prompt, tau 0.05, beta 6 / gamma 1.0 (GenEval), beta 12 / gamma 0.5
  (OCR). Everything else is CHOSEN (the paper, as recorded here, gives no batch, schedule or step counts): 64
  prompts x 6 images per epoch (384: divides over 8 to 64 devices, where Flow-GRPO's 48 prompts x 6 = 288 does
  not divide over 64) in 4 minibatches of 16 whole groups, two optimizer
  steps per epoch, the shared lr 3e-4, ODE rollouts with CFG 4.5, 10 steps online (Flow-GRPO's rollout budget)
  and 40 for the offline dataset (sampled once: SD3.5's usual inference steps), 32 batches (2048 prompts, 12288
  images) in the offline dataset, one (t, eps) draw per minibatch with t ~ U(0, 1) shared by a group, beta
  scaled by Diffusion-DPO's T = 1000 (flowjax/rl/gdro.py), no EMA copy, evaluation every 60 epochs.
"""

from __future__ import annotations

import ml_collections

from flowjax import sharding
from flowjax.models.lora import SD3_ATTENTION_TARGETS
from flowjax.rl.awm import AWM
from flowjax.rl.batching import sample_micro_rows
from flowjax.rl.euphonium import Euphonium
from flowjax.rl.gdro import GDRO
from flowjax.rl.grpo import FlowGRPO
from flowjax.rl.nft import DiffusionNFT
from flowjax.rl.tempflow import TempFlowGRPO

VARIANTS = ("grpo", "cps", "cps_fast", "awm", "nft", "tempflow", "euphonium", "gdro", "gdro_offline")
TASKS = ("geneval", "ocr", "pickscore")

# Per-task values of the references (see the module docstring for the files).
_GRPO_BETA = {"geneval": 0.04, "ocr": 0.04, "pickscore": 0.01}  # Flow-GRPO and Flow-CPS alike
# AWM: (prompts per epoch, micro-batches per epoch over all GPUs = gradient accumulation, rows per device
# micro-batch, KL beta, time_type, eval/save every): 32 GPUs x 6 images x num_batches_per_epoch.
_AWM = {"geneval": (72, 18, 3, 0.001, "discrete_wo_init", 50), "ocr": (72, 18, 3, 0.003, "discrete_wo_init", 20),
        "pickscore": (24, 9, 2, 1e-4, "discrete", 50)}
# DiffusionNFT (n_gpus 8): (mix b, old-policy decay type, gradient steps per epoch).
_NFT = {"geneval": (1.0, 1, 1), "ocr": (0.1, 2, 2), "pickscore": (1.0, 1, 1)}
# flow_grpo *_fast_nocfg: (prompts per epoch, images per prompt).
_FAST = {"geneval": (48, 24), "pickscore": (64, 18)}
# TempFlow-GRPO config/dgx.py *_sd3_pr: KL beta (OCR has no published recipe).
_TEMPFLOW_BETA = {"geneval": 0.004, "pickscore": 0.001}
# GDRO (arXiv 2601.02036): (beta, gamma); the paper reports GenEval and OCR only.
_GDRO = {"geneval": (6.0, 1.0), "ocr": (12.0, 0.5)}


def _with_run_settings(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """What every SD3.5 / FLUX recipe shares: FSDP over all devices, two checkpoints kept, 32-image grids."""
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.sharding_rules = sharding.DEFAULT_RULES
    c.keep_checkpoints = 2
    c.grid_size = 32
    c.tensorboard = True
    return c


def variants(task: str) -> tuple[str, ...]:
    """The variants a task has: cps_fast and tempflow are published for GenEval and PickScore only, GDRO for
    GenEval and OCR."""
    published = {"cps_fast": _FAST, "tempflow": _TEMPFLOW_BETA, "gdro": _GDRO, "gdro_offline": _GDRO}
    return tuple(v for v in VARIANTS if task in published.get(v, TASKS))


def sd35_medium(variant: str, task: str) -> ml_collections.ConfigDict:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    variant = variant or "grpo"
    if variant not in variants(task):
        raise ValueError(f"unknown variant {variant!r} for {task}; choose one of {variants(task)}")
    c = ml_collections.ConfigDict()
    c.seed = 42
    c.variant = variant
    c.method = {"cps": "grpo", "cps_fast": "grpo", "gdro_offline": "gdro"}.get(variant, variant)
    c.dtype = "bfloat16"  # transformer / text encoders / VAE compute
    c.param_dtype = "bfloat16"  # the frozen base weights (LoRA adapters are float32)

    w = c.world = ml_collections.ConfigDict()
    w.name = "sd3"
    w.model = ""  # REQUIRED: --config.world.model=/path/to/stable-diffusion-3.5-medium
    w.text_encoder_3 = True
    w.resolution = 512
    w.max_sequence_length = 128  # T5 tokens (Flow-GRPO's compute_text_embeddings)
    w.train_split, w.eval_split = "train", "test"
    w.precompute_limit = 256  # prompt sets up to this size are encoded once (~1.7 MB each), larger per batch
    w.encode_batch_size = 32

    r = c.reward = ml_collections.ConfigDict()
    r.metrics = ()  # more per-sample metric names of a host reward to return

    c.lora = ml_collections.ConfigDict(dict(rank=32, alpha=64.0, targets=SD3_ATTENTION_TARGETS))
    # The transformer's memory options: blocks rematerialised in the backward pass and query-chunked attention,
    # so a training forward keeps neither per-layer activations nor [heads, L, L] probabilities ("cudnn" on GPUs).
    c.model = ml_collections.ConfigDict(dict(remat="full", attention="chunked"))

    s = c.sample = ml_collections.ConfigDict()
    s.shift = 3.0  # SD3.5's scheduler shift
    s.latent_size = (64, 64)  # resolution / 8
    s.same_noise_per_group = False
    s.eval_num_steps = 40
    s.num_eval_prompts = 0  # the whole test split, as the references evaluate (in sample.micro_batch calls)
    s.eval_samples_per_prompt = 1

    t = c.train = ml_collections.ConfigDict()
    t.steps = 6000  # epochs; the references run until stopped by hand
    t.lr = 3e-4
    t.weight_decay = 1e-4
    t.adam_b1, t.adam_b2, t.adam_eps = 0.9, 0.999, 1e-8
    t.max_grad_norm = 1.0
    t.group_size = 24
    t.max_nan_steps = 20
    c.advantage = dict(std="global", ddof=0, eps=1e-4)  # every reference: global_std=True

    if c.method == "grpo":
        m = c.grpo = FlowGRPO.defaults()
        s.num_steps = 10
        t.prompts_per_batch = 48
        t.minibatches, t.grad_accum = 4, 2  # 288 images per minibatch, 2 optimizer steps per epoch
        m.beta = _GRPO_BETA[task]
        if variant == "cps":
            m.update(kind="cps", noise_level=0.7)  # FlowCPS base.py noise_level 0.7, undivided KL
        elif variant == "cps_fast":
            prompts, group = _FAST[task]
            t.prompts_per_batch, t.group_size = prompts, group
            m.update(kind="cps", noise_level=0.8, guidance=1.0, clip_range=1e-5, beta=0.0)
            m.window.update(size=3, schedule="random", range=(0, 5))
        s.eval_guidance = m.guidance
        c.eval_every = c.checkpoint_every = 60
    elif c.method == "tempflow":
        m = c.tempflow = TempFlowGRPO.defaults()  # K 6, a 0.7, CFG 4.5, clip 1e-4, 9 of 10 steps, EMA 0.9 / 8
        s.num_steps = 10
        s.eval_guidance = m.guidance
        t.prompts_per_batch, t.group_size = 8, 4  # group_size = seeds per prompt (num_image_per_prompt 4)
        t.minibatches, t.grad_accum = 4, 2  # 48 (seed, branch) units = 432 rows per minibatch
        m.beta = _TEMPFLOW_BETA[task]
        c.advantage = dict(std="per_prompt", ddof=0, eps=1e-4)  # per (seed, step) group: global_std=False
        c.eval_every, c.checkpoint_every = 20, 100
    elif c.method == "awm":
        prompts, micro, rows, beta, time_type, every = _AWM[task]
        m = c.awm = AWM.defaults()
        s.num_steps = 14
        s.eval_guidance = 1.0
        t.prompts_per_batch = prompts
        t.minibatches = t.grad_accum = micro  # one optimizer step per epoch
        # SA-Solver with tau 0.4 on [0.3, 0.9] (GenEval, OCR), deterministic (noise_level 0) on PickScore.
        m.update(beta=beta, time_type=time_type, rows_per_draw=rows, noise_level=0.0 if task == "pickscore" else 0.4)
        c.eval_every = c.checkpoint_every = every
    elif c.method == "euphonium":
        m = c.euphonium = Euphonium.defaults()  # the script's values (flowjax/rl/euphonium.py)
        s.num_steps = 16
        t.prompts_per_batch = 48
        t.minibatches, t.grad_accum = 4, 2
        m.guidance = s.eval_guidance = 4.5
        m.integer_timesteps = False  # SD3.5's transformer takes sigma * 1000 as the other recipes here
        c.advantage = dict(std="per_prompt", ddof=1, eps=1e-8)  # per group, torch.std + 1e-8
        if task == "pickscore":
            m.guide.source = "reward"  # PickScore of the decoded x0 prediction, differentiated
        else:
            m.guide.update(source="prm", path="")  # REQUIRED: --config.euphonium.guide.path=DIR (flowjax.prm)
        c.eval_every = c.checkpoint_every = 60
    elif c.method == "gdro":
        beta, gamma = _GDRO[task]
        m = c.gdro = GDRO.defaults()
        offline = variant == "gdro_offline"
        s.num_steps = 40 if offline else 10
        s.eval_guidance = m.guidance  # 4.5
        t.prompts_per_batch, t.group_size = 64, 6  # 384 images: divides over 8, 16, 32 and 64 devices
        t.minibatches, t.grad_accum = 4, 2  # 96 images (16 whole groups) per minibatch, 2 optimizer steps per epoch
        m.update(beta=beta, gamma=gamma, offline=offline, offline_batches=32)
        c.eval_every = c.checkpoint_every = 60
    else:
        mix, decay_type, steps_per_epoch = _NFT[task]
        m = c.nft = DiffusionNFT.defaults()
        s.num_steps = 10
        s.eval_guidance = 1.0
        t.prompts_per_batch = 48
        t.minibatches = 16  # 8 GPUs x 9 = 72 images per minibatch
        t.grad_accum = 16 // steps_per_epoch
        m.update(mix=mix, decay_type=decay_type)
        c.eval_every, c.checkpoint_every = 10, 30

    # Micro-batches that fit a 16 GiB v5e chip (`python -m flowjax.plan`, README "Fitting a mesh"): at most 18 rows
    # per device per rollout / reward / evaluation call (Flow-GRPO's CFG rollout measured at 14.4 GiB peak per v5e-8
    # chip with 24), the largest such size that divides the batch on 8 to 64 devices; 18 rows per gradient call, 12
    # with PickScore (its 3.9 GiB CLIP-H stays resident: Flow-GRPO's update at 18 did not fit v5e-8, at 12 14.9 GiB).
    s.micro_batch = _micro_batch(t.prompts_per_batch * t.group_size, MAX_MICRO_ROWS)
    t.micro_batch = 12 if task == "pickscore" else MAX_MICRO_ROWS
    return _with_run_settings(c)


MAX_MICRO_ROWS = 18
MESH_SIZES = (8, 16, 32, 64)


def _micro_batch(batch: int, cap: int) -> int:
    """The largest sample.micro_batch <= cap that the trainer accepts (`batching.sample_micro_rows`) for `batch`
    rollouts on every mesh of MESH_SIZES devices that divides the batch."""

    def valid(micro: int) -> bool:
        try:
            for devices in MESH_SIZES:
                if batch % devices == 0:
                    sample_micro_rows(batch, devices, micro)
        except ValueError:
            return False
        return True

    return max(m for m in range(1, cap + 1) if valid(m))


# ------------------------------------------------------------------------------------------ FLUX.1-dev

FLUX_VARIANTS = {"pickscore": ("grpo", "dance", "mixgrpo"), "geneval": ("grpo",)}


def flux_dev(variant: str, task: str) -> ml_collections.ConfigDict:
    """The published FLUX.1-dev RL settings (configs/flux_pickscore.py, flux_geneval.py).

    - grpo, Flow-GRPO `config/grpo.py:pickscore_flux` (as in IamCreateAI/FlowCPS b402c7a, a fork of
      yifan123/flow_grpo) with `scripts/train_flux.py`: 6 SDE steps at noise level 0.9, 28-step evaluation, FLUX's
      embedded guidance 3.5 and no CFG, 512 px, 32 GPUs x 3 images x 12 micro-batches = 48 prompts x 24, two
      optimizer steps per epoch, no KL, clip 1e-4, int(6 x 0.99) = 5 trained steps, LoRA rank 64 alpha 128 on the
      attention and feed-forward layers, lr 3e-4, EMA copy 0.9 every 8, evaluation every 30 epochs. The GenEval
      task has no published FLUX recipe: its grpo variant is this one with the GenEval reward and Flow-GRPO's
      SD3.5 GenEval KL weight 0.04 (our choice).
    - dance, DanceGRPO `scripts/finetune/finetune_flux_grpo.sh` with `fastvideo/train_grpo_flux.py`
      (XueZeyue/DanceGRPO 15cc71d): full fine-tuning at lr 1e-5, weight decay 1e-4, 16 GPUs x 1 prompt x 12
      images, 4 accumulated samples per optimizer step, 16 steps of the dance kernel (eta 0.3) on DanceGRPO's
      shift-3 linspace, a random 60% of the first 15 steps trained per sample, integer timesteps, one initial
      noise per group, unbiased per-group std + 1e-8, clip 1e-4, advantage clip 5, no KL, 720 px, 300 epochs,
      HPS-v2.1 reward.
    - mixgrpo, MixGRPO `scripts/finetune/finetune_flux_grpo_MixGRPO.sh` (Tencent-Hunyuan/MixGRPO e5cdd6a): the
      same trainer with Flow-GRPO's SDE kernel (`--flow_grpo_sampling`) at eta 0.7, 25 steps, a progressive
      4-step window (one step later every 25 iterations, rolled back, never the last 2), only the window
      trained, 32 GPUs x 1 prompt x 12, 3 accumulated samples per step. Its default reward mixes HPS-v2.1,
      CLIP score, ImageReward, PickScore and UnifiedReward; flowjax has no ImageReward / UnifiedReward, so the
      variant takes the script's HPS-only option (`reward_model="hpsv2"`).
    """
    from flowjax.models.lora import FLUX_FLOW_GRPO_TARGETS

    if task not in FLUX_VARIANTS:
        raise ValueError(f"unknown FLUX task {task!r}; choose one of {tuple(FLUX_VARIANTS)}")
    variant = variant or "grpo"
    if variant not in FLUX_VARIANTS[task]:
        raise ValueError(f"unknown variant {variant!r} for FLUX {task}; choose one of {FLUX_VARIANTS[task]}")
    c = ml_collections.ConfigDict()
    c.seed = 42
    c.variant, c.method = variant, "grpo"
    c.dtype = c.param_dtype = "bfloat16"
    w = c.world = ml_collections.ConfigDict()
    w.name = "flux"
    w.model = ""  # REQUIRED: --config.world.model=/path/to/FLUX.1-dev
    w.resolution = 512
    w.guidance = 3.5  # FLUX.1-dev's embedded (distilled) guidance, all three references
    w.max_sequence_length = 512  # T5 tokens, as FluxPipeline
    w.train_split, w.eval_split = "train", "test"
    w.precompute_limit, w.encode_batch_size = 256, 32
    c.reward = ml_collections.ConfigDict(dict(metrics=()))
    c.model = ml_collections.ConfigDict(dict(remat="full", attention="chunked"))
    s = c.sample = ml_collections.ConfigDict()
    s.same_noise_per_group = False
    s.num_eval_prompts = 0
    s.eval_samples_per_prompt = 1
    s.eval_num_steps = 28
    s.eval_guidance = 1.0  # no CFG: FLUX.1-dev's guidance is embedded
    t = c.train = ml_collections.ConfigDict()
    t.adam_b1, t.adam_b2, t.adam_eps = 0.9, 0.999, 1e-8
    t.max_grad_norm = 1.0
    t.max_nan_steps = 20
    c.advantage = dict(std="global", ddof=0, eps=1e-4)
    m = c.grpo = FlowGRPO.defaults()
    m.guidance = 1.0
    if variant == "grpo":
        s.shift = "dynamic"  # FLUX's resolution-dependent shift (the pipeline's scheduler)
        c.lora = ml_collections.ConfigDict(dict(rank=64, alpha=128.0, targets=FLUX_FLOW_GRPO_TARGETS))
        s.num_steps = 6
        t.steps, t.lr, t.weight_decay = 6000, 3e-4, 1e-4
        t.prompts_per_batch, t.group_size = 48, 24
        t.minibatches, t.grad_accum = 12, 6  # 96 images per minibatch, two optimizer steps per epoch
        m.update(kind="sde", noise_level=0.9, beta=0.04 if task == "geneval" else 0.0, timestep_fraction=0.99)
        c.eval_every = c.checkpoint_every = 30
    else:  # DanceGRPO / MixGRPO: full fine-tuning of the transformer
        c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=0.0, targets=()))
        w.resolution = 720
        s.shift = 3.0  # their own shift-3 linspace (schedule="dance"), not FLUX's dynamic shift (a float: any
        # "--config.sample.shift=dynamic" override is refused by the dance schedule)
        s.same_noise_per_group = True  # --init_same_noise
        t.steps, t.lr, t.weight_decay = 300, 1e-5, 1e-4
        t.group_size = 12  # --num_generations
        c.advantage = dict(std="per_prompt", ddof=1, eps=1e-8)  # --use_group: unbiased group std + 1e-8
        m.update(schedule="dance", integer_timesteps=True, beta=0.0, clip_range=1e-4, adv_clip=5.0,
                 filter_zero_advantage=False)
        m.eval_ema.decay = 0.0  # no EMA copy in either reference
        if variant == "dance":
            s.num_steps = 16
            t.prompts_per_batch, t.minibatches, t.grad_accum = 16, 12, 4  # 16 GPUs, 3 optimizer steps per epoch
            m.update(kind="dance", noise_level=0.3, random_steps=True, timestep_fraction=0.6)
            c.eval_every = c.checkpoint_every = 40
        else:
            s.num_steps = 25
            t.prompts_per_batch, t.minibatches, t.grad_accum = 32, 12, 3  # 32 GPUs, 4 optimizer steps per epoch
            m.update(kind="sde", noise_level=0.7)
            m.window.update(size=4, schedule="progressive", shift_interval=25, stride=1, roll_back=True)
            c.eval_every = c.checkpoint_every = 50
    s.latent_size = (w.resolution // 8, w.resolution // 8)
    return _with_run_settings(c)
