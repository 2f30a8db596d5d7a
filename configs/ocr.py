"""RL of Stable Diffusion 3.5 Medium on visual text rendering (OCR), scored by PP-OCRv4 on the accelerator.

  # 1. the OCR models: PP-OCRv4 detection + recognition ONNX files, read by flowjax (no OCR runtime runs)
  pip install -e ".[ocr]" && pip install --no-deps rapidocr-onnxruntime
  # 2. train (Flow-GRPO by default; :cps, :awm, :nft, :gdro, :gdro_offline for the others):
  python -m flowjax.train --config=configs/ocr.py --workdir=runs/ocr \\
      --config.world.model=/path/to/stable-diffusion-3.5-medium --config.world.prompts=/path/to/flow_grpo/dataset/ocr
  python -m flowjax.train --config=configs/ocr.py:nft --workdir=runs/ocr_nft \\
      --config.world.model=/path/to/stable-diffusion-3.5-medium --config.world.prompts=/path/to/flow_grpo/dataset/ocr

Keys you will set: `world.model` (a diffusers SD3 / SD3.5 pipeline folder, required), `world.prompts` (a
folder with train.txt / test.txt, one prompt per line with the text to render in double quotes, e.g.
Flow-GRPO's dataset/ocr; required). Evaluation (ODE, `sample.eval_num_steps` steps, fixed noise, the whole test split in
`sample.micro_batch` calls; `sample.num_eval_prompts` caps it) logs `eval/reward_mean` and `eval/accuracy` to WORKDIR/metrics.jsonl.

The reward (`flowjax.rewards.load("ocr")`, flowjax/rewards/ocr.py) is Flow-GRPO's (flow_grpo/ocr.py):
1 - min(d, len(text)) / len(text), d the edit distance between the text read from the image and the text
in the prompt's first double quotes (both without spaces, lower-cased; d = 0 when the text occurs in the
reading); `accuracy` = reward == 1. It runs PP-OCRv4 detection and recognition as jitted NNX modules inside
the training step, with PaddleOCR's settings as Flow-GRPO calls it (`reward.options.preset="paddleocr"`;
"rapidocr" for rapidocr's); `reward.path` = a folder with the two ONNX files ("" = the installed
rapidocr-onnxruntime's). To score with a reward server instead (flowjax's JSON protocol,
flowjax.rewards.remote.RemoteReward: POST {"images": [base64 JPEG], "prompts": [str], "metadata":
[{"prompt", "text"}]}, reply {"scores": [float]}):
  --config.reward.name=remote --config.reward.url=http://10.0.0.5:18086/score \\
  --config.reward.options='{"timeout": 120.0, "retries": 3, "batch_size": 64}'
(extra per-sample keys of the server's reply are returned when named in `reward.metrics`).

Variants (each method's published SD3.5-M recipe, sources and per-value citations in flowjax/recipes.py; the
batch sizes are the references' 32-GPU epochs, scale `train.prompts_per_batch` and `train.minibatches` /
`train.grad_accum` down for fewer devices):
- grpo (default), Flow-GRPO `config/grpo.py:general_ocr_sd3`: SDE sampler, noise level 0.7, 10 steps, CFG 4.5
  in rollouts and training, 48 prompts x 24 images per epoch in 4 minibatches of 288, two optimizer steps per
  epoch, clip range 1e-4, KL beta 0.04 (divided by 2 std_t^2), the first 9 of the 10 steps trained, rows whose
  advantage is 0 left out, EMA evaluation copy (0.9, every 8 minibatches), evaluation every 60 epochs.
- cps, Flow-CPS: the same with the coefficients-preserving sampler at noise level 0.7 and the undivided KL.
  (flow_grpo publishes no fast CFG-free recipe for OCR, nor TempFlow-GRPO a process-reward one: no cps_fast
  or tempflow variant here.)
- awm, AWM `config/dgx_awm.py:ocr_sd3_no_cfg_4nodes`: CFG-free 14-step SA-Solver rollouts (tau 0.4 on sigma in
  [0.3, 0.9]), 72 prompts x 24 per epoch, one optimizer step per epoch over 18 minibatches of 96, 6 stratified
  timesteps per 3-row group, beta 0.003, KL-EMA weight 1, EMA copy 0.99 per epoch, evaluation every 20 epochs.
- nft, DiffusionNFT `config/nft.py:sd3_ocr`: CFG-free 10-step dpm2 rollouts with the old policy, 48 x 24 in
  16 minibatches of 72, two optimizer steps per epoch, mix b 0.1, KL 1e-4, old-policy decay type 2, EMA copy
  0.9 per optimizer step, evaluation every 10 epochs.
- euphonium, Euphonium (zerzerzerz/Euphonium d9f2c39; its only published recipe is HunyuanVideo's, so the image
  settings are ours, flowjax/recipes.py says which): 16 DanceGRPO steps (eta 0.25), guided on the last 4 with
  c_i = eta^2 / (2 * 3.125) * delta_t, log-probs under the unguided mean, outcome + process PPO terms (1 and 1,
  clip 1e-4), a random 60% of the steps trained, per-group unbiased std, CFG 4.5, no KL. The OCR reward has no gradient:
  the guide is a latent PRM trained first (`python -m flowjax.prm --config=configs/ocr.py:euphonium --workdir=DIR
  ...`, then `--config.euphonium.guide.path=DIR/prm`).
- gdro, GDRO (arXiv 2601.02036; no public code): ODE rollouts (CFG 4.5, 10 steps) of k = 6 images per prompt,
  64 prompts per epoch in 4 minibatches of 16 whole groups, two optimizer steps per epoch; the soft-target
  Plackett-Luce loss (tau 0.05) of the implicit rewards (beta 12 x Diffusion-DPO's T = 1000) plus
  0.5 x the flow-matching loss of each group's best image, one (t, eps) draw shared by a group per minibatch.
  The paper's OCR values are k, tau, beta and gamma; the rest is chosen (flowjax/recipes.py, flowjax/rl/gdro.py).
- gdro_offline, GDRO's offline mode: the same loss on a fixed dataset of 32 batches (2048 prompts x 6 images,
  40-step ODE samples of the base model) sampled and scored once into WORKDIR/rollouts/, then trained on for
  every epoch without sampling; a resumed run reuses the dataset.
Shared: LoRA rank 32 alpha 64 on the joint attention's projections, AdamW lr 3e-4, weight decay 1e-4,
eps 1e-8, grad-norm clip 1.0, shift 3 (the scheduler's), seed 42, global-std advantages, 512 px, T5 length 128.
What still differs from the references, and why:
- the OCR models are rapidocr's Chinese + English PP-OCRv4 (Flow-GRPO's PaddleOCR lang="en" loads English-only
  models that are not on PyPI; flowjax.rewards.ocr says more);
- the zero-advantage filter and AWM's timestep draws work on the global batch / minibatch (the references do
  both per process; the same with one process);
"""

import ml_collections

from flowjax.recipes import sd35_medium, variants

VARIANTS = variants("ocr")


def get_config(arg: str = "grpo"):
    c = sd35_medium(arg, "ocr")
    w, r = c.world, c.reward
    w.prompts = ""  # REQUIRED: folder with train.txt / test.txt (Flow-GRPO's dataset/ocr)
    w.prompt_kind = "ocr"
    r.name = "ocr"  # PP-OCRv4 on the accelerator (flowjax.rewards.ocr); "remote" + r.url for a reward server
    r.url = ""
    r.path = ""  # "" = the ONNX files of the installed rapidocr-onnxruntime
    r.options = ml_collections.ConfigDict(dict(preset="paddleocr", max_boxes=8, max_width=1280))
    return c
