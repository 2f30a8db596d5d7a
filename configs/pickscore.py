"""RL of Stable Diffusion 3.5 Medium on human preference (PickScore), a jittable Flax reward.

  # PickScore_v1 (yuvalkirstain/PickScore_v1, a transformers CLIPModel folder) is read by flowjax's converter
  # and scored inside the jitted training step; prompts are Flow-GRPO's dataset/pickscore (train.txt / test.txt)
  python -m flowjax.train --config=configs/pickscore.py --workdir=runs/pickscore \\
      --config.world.model=/path/to/stable-diffusion-3.5-medium \\
      --config.world.prompts=/path/to/flow_grpo/dataset/pickscore \\
      --config.reward.path=/path/to/PickScore_v1
  python -m flowjax.train --config=configs/pickscore.py:awm --workdir=runs/pickscore_awm \\
      --config.world.model=... --config.world.prompts=... --config.reward.path=... \\
      --config.reward.options.tokenizer=/path/to/CLIP-ViT-H-14-laion2B-s32B-b79K

Keys you will set: `world.model` (a diffusers SD3 / SD3.5 pipeline folder, required), `world.prompts` (a
folder with train.txt / test.txt, one caption per line; required), `reward.path` (the PickScore CLIPModel
folder, required), `reward.options.tokenizer` ("" = the folder's own tokenizer; Flow-GRPO takes tokenizer and
processor from laion/CLIP-ViT-H-14-laion2B-s32B-b79K, which has the same vocabulary and preprocessing).
The reward is exp(logit_scale) * cos(image, text) / 26 (flow_grpo pickscore_scorer.py). Evaluation (ODE,
`sample.eval_num_steps` steps, fixed noise, the first `sample.num_eval_prompts` test prompts) logs
`eval/reward_mean` to WORKDIR/metrics.jsonl.

Variants (each method's published SD3.5-M settings; the batch sizes assume 32 GPUs' worth of devices, scale
`train.prompts_per_batch` and `train.minibatches` / `train.grad_accum` down for fewer):
- grpo (default), Flow-GRPO `config/grpo.py:pickscore_sd3`: SDE sampler, noise level 0.7, 10 sampling steps,
  CFG 4.5 in rollouts and training, 40-step evaluation at CFG 4.5, 48 prompts x 24 images per epoch, two
  optimizer steps per epoch, clip range 1e-4, KL beta 0.01, timestep_fraction 0.99 (9 of the 10 steps
  trained), global-std advantages, 512 px, T5 length 128.
- cps: the same with the coefficients-preserving sampler (noise level 0.8).
- awm, Advantage Weighted Matching `config/dgx_awm.py:pickscore_sd3_no_cfg_*`: CFG-free 14-step ODE rollouts,
  24 prompts x 24 per epoch, one optimizer step per epoch, 6 stratified timesteps over the first 90% of the
  steps, beta 1e-4, EMA KL weight 1, clip range 1 (the reference's time_type "discrete" also draws the first
  step; flowjax's trainer always skips it, as "discrete_wo_init").
- nft, DiffusionNFT `config/nft.py:sd3_pickscore`: CFG-free 10-step ODE rollouts with the old policy,
  48 x 24, one optimizer step per epoch, mix b 1.0, KL 1e-4, old-policy decay type 1, timestep_fraction 0.99.
Shared: LoRA rank 32 alpha 64 on the joint attention's projections, AdamW lr 3e-4, weight decay 1e-4,
eps 1e-8, grad-norm clip 1.0, shift 3 (the scheduler's), seed 42.
Differences from the references: AWM's SA-solver and DiffusionNFT's dpm2 solver are Euler ODE steps here;
Flow-GRPO's EMA evaluation copy is not kept.
"""

import ml_collections

from flowjax.recipes import sd35_medium, variants

VARIANTS = variants("pickscore")


def get_config(arg: str = "grpo"):
    c = sd35_medium(arg, "pickscore")
    w, r = c.world, c.reward
    w.prompts = ""  # REQUIRED: folder with train.txt / test.txt (Flow-GRPO's dataset/pickscore)
    w.prompt_kind = "plain"
    r.name = "pickscore"
    r.path = ""  # REQUIRED: --config.reward.path=/path/to/PickScore_v1 (transformers CLIPModel folder)
    # tokenizer "" = the folder's own; dtype of the reward model's compute and weights.
    r.options = ml_collections.ConfigDict(dict(tokenizer="", dtype="float32", param_dtype="float32"))
    return c
