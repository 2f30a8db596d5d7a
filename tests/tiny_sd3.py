"""A tiny random diffusers `StableDiffusion3Pipeline`, built offline, for the tests (and the notebook test).

`save_tiny_sd3(path)` writes a whole SD3.5-Medium-shaped pipeline folder (model_index.json, transformer/,
vae/, text_encoder/, text_encoder_2/, text_encoder_3/, tokenizer/, tokenizer_2/, tokenizer_3/, scheduler/)
in a few hundred kilobytes; `make_tiny_sd3()` returns the torch pipeline itself. Every weight is perturbed
(norms off one, AdaLN-Zero off zero) so that every path of every model matters. The tokenizers are real
byte-level BPE (CLIP) and Unigram (T5) tokenizers over small vocabularies written here, no download.

Sizes: CLIP-L hidden 12 / projection 8 (legacy eos_token_id 2: pooled at the argmax id), CLIP-G hidden 16 /
projection 12 (eos_token_id of <|endoftext|>, padded with "!", as SD3's tokenizer_2), T5 d_model 32
(= joint_attention_dim; the CLIP features 12 + 16 = 28 are zero-padded to 32), pooled 8 + 12 = 20, a VAE with
two levels (2 pixels per latent pixel a side) and 4 latent channels, patch size 2: heights and widths
are multiples of 4, at most pos_embed_max_size * 4 = 64 pixels a side.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

CLIP_MAX_LENGTH = 77  # SD3's tokenizers' model_max_length; the CLIP position tables have 77 rows
VAE_SCALE_FACTOR = 2
PATCH_SIZE = 2
T5_DIM = 32

# Word pieces the tokenizers know beyond single characters (everything else falls back to bytes / letters).
WORDS = ("a", "the", "cat", "dog", "red", "blue", "photo", "of", "on", "mat", "ugly", "blurry")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable character table."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_vocab(folder) -> Path:
    """vocab.json + merges.txt of a small byte-level CLIP BPE (bytes, bytes</w>, a few word merges, specials last)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    merges = []
    for word in WORDS:
        # merge left to right: w0 w1 -> w0w1, (w0w1) w2 -> ..., the last piece carrying </w>
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        acc = pieces[0]
        for p in pieces[1:]:
            merge = f"{acc} {p}"
            acc = acc + p
            if merge not in merges:
                merges.append(merge)
                if acc not in vocab_list:
                    vocab_list.append(acc)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]  # <|endoftext|> has the largest id, as in CLIP
    vocab = {t: i for i, t in enumerate(vocab_list)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def clip_tokenizers(tmp):
    """(tokenizer, tokenizer_2) as SD3 has them: same BPE, pad <|endoftext|> and pad "!" respectively."""
    from transformers import CLIPTokenizer

    src = write_clip_vocab(Path(tmp) / "clip_vocab")
    tok = CLIPTokenizer.from_pretrained(src, model_max_length=CLIP_MAX_LENGTH)
    tok_2 = CLIPTokenizer.from_pretrained(src, model_max_length=CLIP_MAX_LENGTH, pad_token="!")
    return tok, tok_2


def t5_tokenizer():
    """A Unigram T5 tokenizer: <pad>=0, </s>=1, <unk>=2, then word pieces and single letters."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{w}", -3.0 - 0.1 * i) for i, w in enumerate(WORDS)]
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    vocab += [(c, -6.0) for c in letters + ",.!?"]
    vocab += [(f"▁{c}", -5.0) for c in letters if c not in WORDS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def perturbed(model, scale, seed):
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def make_tiny_sd3(tmp, seed: int = 0, with_t5: bool = True):
    """The torch `StableDiffusion3Pipeline` (fp32, CPU); `tmp` is a scratch folder for the tokenizer files."""
    import diffusers
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=16, patch_size=PATCH_SIZE, in_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=T5_DIM, caption_projection_dim=16, pooled_projection_dim=20,
        out_channels=4, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609,
    )
    tok, tok_2 = clip_tokenizers(tmp)
    vocab = len(tok)
    clip_l = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        vocab_size=vocab, hidden_size=12, intermediate_size=20, projection_dim=8, num_hidden_layers=3,
        num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="quick_gelu",
        bos_token_id=tok.bos_token_id, eos_token_id=2, pad_token_id=1,
    ))
    clip_g = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=24, projection_dim=12, num_hidden_layers=3,
        num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="gelu", layer_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=1,
    ))
    t5, tok_3 = None, None
    if with_t5:
        tok_3 = t5_tokenizer()
        t5 = transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=len(tok_3), d_model=T5_DIM, d_kv=8, d_ff=40, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        ))
    for i, m in enumerate([transformer, clip_l, clip_g, t5]):
        if m is not None:
            perturbed(m, 0.1, seed + 1 + i)
    perturbed(vae, 0.05, seed + 10)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clip_l, tokenizer=tok,
        text_encoder_2=clip_g, tokenizer_2=tok_2, text_encoder_3=t5, tokenizer_3=tok_3,
    )


def save_pipeline(make, path, **kwargs) -> Path:
    """Builds a tiny torch pipeline with `make(tmp, **kwargs)` (`tmp` a scratch folder for its tokenizer files)
    and saves it (safetensors) as a diffusers folder at `path`; returns `path`."""
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = make(tmp, **kwargs)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def save_tiny_sd3(path, seed: int = 0, with_t5: bool = True) -> Path:
    """Builds the tiny random pipeline and saves it (safetensors) as a diffusers folder at `path`; returns `path`."""
    return save_pipeline(make_tiny_sd3, path, seed=seed, with_t5=with_t5)
