"""A tiny random diffusers `FluxPipeline` (dev or schnell shaped), built offline, for the tests.

`save_tiny_flux(path, dev=True)` writes a whole pipeline folder (model_index.json, transformer/, vae/, text_encoder/,
text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/) of a few hundred kilobytes; `make_tiny_flux()` returns the
torch pipeline. Every weight is perturbed (norms off one, AdaLN-Zero off zero) so that every path matters; the
tokenizers are those of `tiny_sd3` (byte-level BPE CLIP, Unigram T5), no download.

Sizes: CLIP-L hidden 12 (= pooled_projection_dim, legacy eos_token_id 2), T5 d_model 32 (= joint_attention_dim),
a VAE with two levels (2 pixels per latent pixel a side), 4 latent channels (in_channels 16 after the 2x2 packing),
FLUX's VAE scaling 0.3611 / shift 0.1159 and no quant convs: heights and widths are multiples of 4. The dev
scheduler shifts dynamically with base / max image sequence lengths 16 / 256 (so tiny images span the range), the
schnell one by a fixed shift 1, as the released configs.
"""

from __future__ import annotations

from pathlib import Path

from tiny_sd3 import CLIP_MAX_LENGTH, clip_tokenizers, perturbed, save_pipeline, t5_tokenizer

VAE_SCALE_FACTOR = 2
T5_DIM = 32
CLIP_DIM = 12


def make_tiny_flux(tmp, seed: int = 0, dev: bool = True):
    """The torch `FluxPipeline` (fp32, CPU); `tmp` is a scratch folder for the tokenizer files."""
    import diffusers
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    transformer = diffusers.FluxTransformer2DModel(
        in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=T5_DIM, pooled_projection_dim=CLIP_DIM, guidance_embeds=dev, axes_dims_rope=(2, 2, 4),
    )
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
    )
    tok, _ = clip_tokenizers(tmp)
    clip_l = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tok), hidden_size=CLIP_DIM, intermediate_size=20, projection_dim=8, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="quick_gelu",
        bos_token_id=tok.bos_token_id, eos_token_id=2, pad_token_id=1,
    ))
    tok_2 = t5_tokenizer()
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(tok_2), d_model=T5_DIM, d_kv=8, d_ff=40, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ))
    for i, m in enumerate([transformer, clip_l, t5]):
        perturbed(m, 0.1, seed + 1 + i)
    perturbed(vae, 0.05, seed + 10)
    if dev:
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=16,
            max_image_seq_len=256)
    else:
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return diffusers.FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip_l, tokenizer=tok,
                                  text_encoder_2=t5, tokenizer_2=tok_2, transformer=transformer)


def save_tiny_flux(path, seed: int = 0, dev: bool = True) -> Path:
    """Builds the tiny random pipeline and saves it (safetensors) as a diffusers folder at `path`; returns `path`."""
    return save_pipeline(make_tiny_flux, path, seed=seed, dev=dev)
