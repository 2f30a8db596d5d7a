"""RL of FLUX.1-dev on human preference: Flow-GRPO with PickScore, DanceGRPO and MixGRPO with HPS-v2.1.

  python -m flowjax.train --config=configs/flux_pickscore.py --workdir=runs/flux_pick \\
      --config.world.model=/path/to/FLUX.1-dev --config.world.prompts=/path/to/flow_grpo/dataset/pickscore \\
      --config.reward.path=/path/to/PickScore_v1
  python -m flowjax.train --config=configs/flux_pickscore.py:dance --workdir=runs/flux_dance \\
      --config.world.model=/path/to/FLUX.1-dev --config.world.prompts=/path/to/prompts \\
      --config.reward.path=/path/to/HPS_v2.1_compressed.pt

Keys you will set: `world.model` (a diffusers FLUX.1-dev pipeline folder), `world.prompts` (a folder with
train.txt / test.txt, one caption per line), `reward.path` (PickScore_v1 for grpo, HPS_v2.1_compressed.pt for dance
and mixgrpo). Variants and their sources: flowjax/recipes.py `flux_dev` (grpo: Flow-GRPO `pickscore_flux`; dance:
DanceGRPO's FLUX script; mixgrpo: MixGRPO's FLUX script with its HPS-only reward). What differs from the references:
MixGRPO's default five-reward mix needs ImageReward and UnifiedReward, which flowjax does not have; DanceGRPO and
MixGRPO prompts come from their HPD json files (give them as a train.txt); AWM publishes no FLUX training code, so
there is no awm variant.
"""

import ml_collections

from flowjax.recipes import FLUX_VARIANTS, flux_dev

VARIANTS = FLUX_VARIANTS["pickscore"]


def get_config(arg: str = "grpo"):
    c = flux_dev(arg, "pickscore")
    c.world.prompts = ""  # REQUIRED: folder with train.txt / test.txt
    c.world.prompt_kind = "plain"
    r = c.reward
    if c.variant == "grpo":
        r.name, r.path = "pickscore", ""  # REQUIRED: PickScore_v1 (a transformers CLIPModel folder)
        r.options = ml_collections.ConfigDict(dict(tokenizer="", dtype="float32", param_dtype="float32"))
    else:
        r.name, r.path = "hpsv2", ""  # REQUIRED: HPS_v2.1_compressed.pt (open_clip ViT-H-14 state dict)
        r.options = ml_collections.ConfigDict(dict(tokenizer="", dtype="float32", param_dtype="float32"))
    return c
