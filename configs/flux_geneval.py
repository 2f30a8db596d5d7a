"""RL of FLUX.1-dev on GenEval (compositional prompts, scored by a GenEval reward server).

  python -m flowjax.train --config=configs/flux_geneval.py --workdir=runs/flux_geneval \\
      --config.world.model=/path/to/FLUX.1-dev --config.reward.url=http://127.0.0.1:18085

No reference publishes a FLUX GenEval recipe: the grpo variant is Flow-GRPO's `pickscore_flux` sampling and
training settings (flowjax/recipes.py `flux_dev`) with the GenEval reward and Flow-GRPO's SD3.5 GenEval KL weight
0.04, our choice. `world.prompts` as configs/geneval.py (GenEval metadata folders; "" = generated prompts).
"""

import ml_collections

from flowjax.recipes import FLUX_VARIANTS, flux_dev

VARIANTS = FLUX_VARIANTS["geneval"]


def get_config(arg: str = "grpo"):
    c = flux_dev(arg, "geneval")
    w, r = c.world, c.reward
    w.prompts, w.prompt_kind = "", "geneval"
    w.generate_train, w.generate_test, w.generate_seed = 5000, 300, 0
    r.name, r.url, r.path = "geneval_remote", "http://127.0.0.1:18085", ""
    r.options = ml_collections.ConfigDict(dict(timeout=120.0, retries=3, batch_size=64, only_strict=False))
    return c
