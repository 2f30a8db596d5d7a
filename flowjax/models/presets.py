"""Architectures of the published models, for what needs shapes without weights (`flowjax.plan`, benchmarks).

Each entry is the model's config.json as its library writes it (diffusers / transformers names), so the
same `from_diffusers` / `from_transformers` readers build them; when a weights folder is at hand, its own
config.json takes precedence. Values from the Hugging Face repositories named in each comment.
"""

from __future__ import annotations

# stabilityai/stable-diffusion-3.5-medium transformer/config.json (MMDiT-X: dual attention in blocks 0-12).
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
# stabilityai/stable-diffusion-3.5-large transformer/config.json.
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
# stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json.
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
# Not a published model: a tiny SD3.5-Medium-shaped MMDiT (dual attention in its first 2 blocks, RMS q/k norm)
# for CPU benchmarks (benchmarks/mmdit.py, benchmarks/pipeline.py) and plans (`--preset=sd3-tiny`).
SD3_TINY = dict(sample_size=32, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=32,
                num_attention_heads=4, joint_attention_dim=256, caption_projection_dim=128, pooled_projection_dim=64,
                out_channels=16, pos_embed_max_size=64, dual_attention_layers=(0, 1), qk_norm="rms_norm")
TRANSFORMERS = {"sd35-medium": SD35_MEDIUM, "sd35-large": SD35_LARGE, "sd3-medium": SD3_MEDIUM, "sd3-tiny": SD3_TINY}

# black-forest-labs/FLUX.1-dev transformer/config.json (a FluxTransformer2DModel: 19 double-stream and 38
# single-stream blocks, guidance embedding); FLUX.1-schnell's differs only by guidance_embeds false.
FLUX_DEV = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_SCHNELL = {**FLUX_DEV, "guidance_embeds": False}
# Not a published model: a tiny FLUX.1-dev-shaped transformer (guidance embedding, 16 latent channels) for tests
# and CPU benchmarks (`python -m flowjax.plan --preset=flux-tiny`, benchmarks/mmdit.py flux-tiny).
FLUX_TINY = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=2, num_single_layers=4,
                 attention_head_dim=32, num_attention_heads=4, joint_attention_dim=256, pooled_projection_dim=64,
                 guidance_embeds=True, axes_dims_rope=(8, 12, 12))
FLUX_TRANSFORMERS = {"flux-dev": FLUX_DEV, "flux-schnell": FLUX_SCHNELL, "flux-tiny": FLUX_TINY}

# The SD3 / SD3.5 VAE (stable-diffusion-3.5-medium vae/config.json): 16 latent channels, no quant convs.
SD3_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
               layers_per_block=2, act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024,
               scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
               mid_block_add_attention=True, force_upcast=True)
# The FLUX.1 VAE (FLUX.1-dev and -schnell vae/config.json): the same architecture, its own scaling and shift.
FLUX_VAE = {**SD3_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}
# Not published models: the FLUX / SD3 VAE layout (16 latent channels, 8x down-sampling) with 8 channels per
# block, the VAEs of the tiny presets.
_TINY_VAE_BLOCKS = {"block_out_channels": (8, 8, 8, 8), "layers_per_block": 1, "norm_num_groups": 4}
TINY_FLUX_VAE = {**FLUX_VAE, **_TINY_VAE_BLOCKS}
TINY_SD3_VAE = {**SD3_VAE, **_TINY_VAE_BLOCKS}
# The VAE that goes with a transformer preset when a config has no model folder (default: the family's VAE).
PRESET_VAES = {"flux-tiny": TINY_FLUX_VAE, "sd3-tiny": TINY_SD3_VAE}

# SD3's text encoders (text_encoder, text_encoder_2, text_encoder_3 config.json): CLIP-L/14 and OpenCLIP
# bigG/14 text towers with projections, and the T5 v1.1 XXL encoder.
CLIP_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
                   num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                   layer_norm_eps=1e-5)
CLIP_G_TEXT = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280,
                   num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                   layer_norm_eps=1e-5)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
              layer_norm_epsilon=1e-6, is_gated_act=True, dense_act_fn="gelu_new")

# yuvalkirstain/PickScore_v1 (a CLIP ViT-H/14 CLIPModel): text and vision configs.
PICKSCORE_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, projection_dim=1024,
                      num_hidden_layers=24, num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
                      layer_norm_eps=1e-5)
PICKSCORE_VISION = dict(hidden_size=1280, intermediate_size=5120, projection_dim=1024, num_hidden_layers=32,
                        num_attention_heads=16, image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5)
