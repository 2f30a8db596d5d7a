"""Pretraining of the shapes world's base model (tiny CLIP text tower + tiny MMDiT on 36x36 pixels).

  python -m flowjax.pretrain --config=configs/shapes_pretrain.py --workdir=runs/shapes_base
The shipped base model (flowjax/assets/shapes_base) was trained with this file as it is; the README
says how long it took. `--config.train.steps=200` gives a quick (poor) base for experiments.
"""

import ml_collections

from flowjax.data import shapes


def get_config(arg: str = ""):
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.image_size = 36
    # One 12x12 patch per 3x3-layout cell, so an object is one token (as a 16x16-pixel SD3 token); the
    # model predicts the clean image, since a 128-wide token cannot carry a 432-value velocity
    # (flowjax/models/prediction.py).
    c.prediction = "sample"
    c.held_out_fraction = 0.2  # the RL split; pretraining sees every caption of the world
    c.split_seed = 0
    c.text_encoder = dict(vocab_size=len(shapes.VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=shapes.MAX_TOKENS, projection_dim=64,
                          hidden_act="gelu", eos_token_id=shapes.TOKEN_IDS[shapes.EOS])
    c.model = dict(sample_size=36, patch_size=12, in_channels=3, out_channels=3, num_layers=4,
                   attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=128,
                   pooled_projection_dim=64, pos_embed_max_size=3, qk_norm="rms_norm")

    t = c.train = ml_collections.ConfigDict()
    t.steps = 3000
    t.batch_size = 64
    t.lr = 1e-3
    t.warmup_steps = 100
    t.final_lr_fraction = 0.1
    t.weight_decay = 0.0
    t.max_grad_norm = 1.0
    t.ema_decay = 0.998
    t.caption_dropout = 0.1
    t.balance_tasks = True  # each batch draws the four tasks equally often (see pretrain.draw_captions)
    t.logit_mean, t.logit_std = 0.0, 1.0
    t.shift = 3.0  # training sigmas shifted towards noise, as SD3 does for large images (see flow_matching_loss)

    e = c.eval = ml_collections.ConfigDict()
    e.every = 500
    e.num_steps = 16
    e.shift = 3.0
    e.guidance = 3.0
    e.grid_size = 32
    c.log_every = 50
    return c
