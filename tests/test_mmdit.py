"""MMDiT parity with diffusers' SD3Transformer2DModel on tiny random configs (fp32, CPU)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from flowjax.convert import load_transformer  # noqa: E402
from flowjax.models.mmdit import MMDiTConfig  # noqa: E402

# name -> (diffusers config, latent (H, W), text length)
CONFIGS = {
    # SD3-Medium-like: no dual attention, no qk norm.
    "sd3": (dict(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                 pooled_projection_dim=10, out_channels=4, pos_embed_max_size=12), (16, 16), 7),
    # SD3.5-Medium-like: leading dual-attention blocks, rms qk-norm, plain blocks, pre-only last block.
    "sd35_medium": (dict(sample_size=16, patch_size=2, in_channels=4, num_layers=5, attention_head_dim=8,
                         num_attention_heads=3, joint_attention_dim=20, caption_projection_dim=24,
                         pooled_projection_dim=12, out_channels=4, pos_embed_max_size=12,
                         dual_attention_layers=(0, 1, 2), qk_norm="rms_norm"), (12, 20), 9),
    # SD3.5-Large-like: qk norm, no dual attention.
    "sd35_large": (dict(sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=4,
                        num_attention_heads=4, joint_attention_dim=8, caption_projection_dim=16,
                        pooled_projection_dim=6, out_channels=4, pos_embed_max_size=10,
                        qk_norm="rms_norm"), (8, 8), 5),
    # Odd sizes everywhere; dual layers not at the start; non-square latent; patch size 1.
    "odd": (dict(sample_size=6, patch_size=1, in_channels=3, num_layers=4, attention_head_dim=12,
                 num_attention_heads=3, joint_attention_dim=7, caption_projection_dim=36,
                 pooled_projection_dim=5, out_channels=5, pos_embed_max_size=9,
                 dual_attention_layers=(1, 3), qk_norm="rms_norm"), (5, 9), 3),
    # A single block that is both dual and the pre-only last block.
    "one_block": (dict(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                       num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                       pooled_projection_dim=10, out_channels=4, pos_embed_max_size=8,
                       dual_attention_layers=(0,), qk_norm="rms_norm"), (16, 6), 4),
}


def make_reference(config, seed=0):
    torch.manual_seed(seed)
    model = diffusers.SD3Transformer2DModel(**config).eval()
    with torch.no_grad():  # AdaLN-Zero starts at zero; randomise so every path matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def random_inputs(config, hw, text_len, batch, seed=1):
    g = np.random.default_rng(seed)
    x = g.standard_normal((batch, *hw, config["in_channels"])).astype(np.float32)
    t = g.uniform(0, 1000, size=batch).astype(np.float32)
    ctx = g.standard_normal((batch, text_len, config["joint_attention_dim"])).astype(np.float32)
    pooled = g.standard_normal((batch, config["pooled_projection_dim"])).astype(np.float32)
    return x, t, ctx, pooled


def reference_velocity(model, x, t, ctx, pooled):
    with torch.no_grad():
        out = model(
            hidden_states=torch.from_numpy(x.transpose(0, 3, 1, 2)),
            encoder_hidden_states=torch.from_numpy(ctx),
            pooled_projections=torch.from_numpy(pooled),
            timestep=torch.from_numpy(t),
        ).sample
    return out.numpy().transpose(0, 2, 3, 1)


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (folder, reference model), each saved once for the module."""
    out = {}
    for name, (config, _, _) in CONFIGS.items():
        folder = tmp_path_factory.mktemp(name)
        model = make_reference(config)
        model.save_pretrained(folder)
        out[name] = (folder, model)
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_velocity_parity(saved, name):
    config, hw, text_len = CONFIGS[name]
    folder, ref = saved[name]
    model = load_transformer(folder, dtype=jnp.float32)
    x, t, ctx, pooled = random_inputs(config, hw, text_len, batch=3)
    want = reference_velocity(ref, x, t, ctx, pooled)
    got = np.asarray(model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx), jnp.asarray(pooled)))
    assert got.shape == want.shape
    err = rel_err(got, want)
    print(f"{name}: rel err {err:.2e}")
    assert err < 1e-5


def test_batch_rows_independent(saved):
    """Different timesteps per row: each row equals the batch-of-one result."""
    config, hw, text_len = CONFIGS["sd35_medium"]
    model = load_transformer(saved["sd35_medium"][0], dtype=jnp.float32)
    x, t, ctx, pooled = (jnp.asarray(a) for a in random_inputs(config, hw, text_len, batch=4))
    full = np.asarray(model(x, t, ctx, pooled))
    for i in range(4):
        one = np.asarray(model(x[i:i + 1], t[i:i + 1], ctx[i:i + 1], pooled[i:i + 1]))
        np.testing.assert_allclose(full[i:i + 1], one, rtol=1e-5, atol=1e-5)


def test_jit_bf16_close_to_fp32(saved):
    config, hw, text_len = CONFIGS["sd35_medium"]
    folder = saved["sd35_medium"][0]
    x, t, ctx, pooled = (jnp.asarray(a) for a in random_inputs(config, hw, text_len, batch=2))
    f32 = load_transformer(folder, dtype=jnp.float32)
    b16 = load_transformer(folder, dtype=jnp.bfloat16, remat="full")
    from flax import nnx
    ref = np.asarray(f32(x, t, ctx, pooled))
    got = np.asarray(nnx.jit(lambda m, *a: m(*a))(b16, x, t, ctx, pooled)).astype(np.float32)
    assert rel_err(got, ref) < 5e-2


def test_latent_too_large_is_refused(saved):
    config, _, text_len = CONFIGS["sd3"]
    model = load_transformer(saved["sd3"][0], dtype=jnp.float32)
    x, t, ctx, pooled = random_inputs(config, (26, 8), text_len, batch=1)
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx), jnp.asarray(pooled))


def test_config_validation():
    with pytest.raises(ValueError, match="caption_projection_dim"):
        MMDiTConfig(num_attention_heads=2, attention_head_dim=8, caption_projection_dim=12)
    with pytest.raises(ValueError, match="qk_norm"):
        MMDiTConfig(num_attention_heads=2, attention_head_dim=8, caption_projection_dim=16, qk_norm="l2")
    with pytest.raises(ValueError, match="unknown"):
        MMDiTConfig.from_diffusers({"num_layers": 2, "not_a_key": 1})


def test_stack_layout_of_sd35_medium():
    cfg = MMDiTConfig(num_layers=24, dual_attention_layers=tuple(range(13)), num_attention_heads=24,
                      caption_projection_dim=1536, qk_norm="rms_norm")
    assert cfg.stack_layout() == [(0, 13, True, False), (13, 10, False, False), (23, 1, False, True)]
