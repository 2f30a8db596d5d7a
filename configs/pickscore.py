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
`sample.eval_num_steps` steps, fixed noise, the whole test split in `sample.micro_batch` calls; `sample.num_eval_prompts` caps it) logs
`eval/reward_mean` to WORKDIR/metrics.jsonl.

Variants (each method's published SD3.5-M recipe, sources and per-value citations in flowjax/recipes.py; the
batch sizes are the references' 32-GPU epochs, scale `train.prompts_per_batch` and `train.minibatches` /
`train.grad_accum` down for fewer devices):
- grpo (default), Flow-GRPO `config/grpo.py:pickscore_sd3`: SDE sampler, noise level 0.7, 10 steps, CFG 4.5 in
  rollouts and training, 48 prompts x 24 images per epoch in 4 minibatches of 288, two optimizer steps per
  epoch, clip range 1e-4, KL beta 0.01 (divided by 2 std_t^2), the first 9 of the 10 steps trained, rows whose
  advantage is 0 left out, EMA evaluation copy (0.9, every 8 minibatches), evaluation every 60 epochs.
- cps, Flow-CPS: the same with the coefficients-preserving sampler at noise level 0.7 and the undivided KL.
- cps_fast, flow_grpo `pickscore_sd3_fast_nocfg`: cps at 0.8, no CFG anywhere (evaluation included), clip
  1e-5, no KL, 64 prompts x 18 images, a 3-step SDE window starting in [0, 2] and only the window trained.
- awm, AWM `config/dgx_awm.py:pickscore_sd3_no_cfg_4nodes`: CFG-free 14-step deterministic SA-Solver rollouts,
  24 prompts x 24 per epoch, one optimizer step per epoch over 9 minibatches of 64, 6 stratified timesteps per
  2-row group from the first step on (time_type "discrete": t = 1 can be drawn), beta 1e-4, KL-EMA weight 1,
  EMA copy 0.99 per epoch, evaluation every 50 epochs.
- nft, DiffusionNFT `config/nft.py:sd3_pickscore`: CFG-free 10-step dpm2 rollouts with the old policy, 48 x 24
  in 16 minibatches of 72, one optimizer step per epoch, mix b 1.0, KL 1e-4, old-policy decay type 1, EMA copy
  0.9 per optimizer step, evaluation every 10 epochs.
Shared: LoRA rank 32 alpha 64 on the joint attention's projections, AdamW lr 3e-4, weight decay 1e-4,
eps 1e-8, grad-norm clip 1.0, shift 3 (the scheduler's), seed 42, global-std advantages, 512 px, T5 length 128.
What still differs from the references, and why:
- one SDE window per epoch for cps_fast (flow_grpo draws one per pipeline call, seeded with the process index);
- the zero-advantage filter and AWM's timestep draws work on the global batch / minibatch (the references do
  both per process; the same with one process);
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
