"""FLUX.1 transformer parity with diffusers' FluxTransformer2DModel on tiny random configs (fp32, CPU), the
diffusers -> flowjax -> diffusers round trip, sharded loading, and the errors a user meets."""

import contextlib
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from flowjax import sharding  # noqa: E402
from flowjax.convert import CheckpointError, load_transformer, save_transformer  # noqa: E402
from flowjax.models.flux import Flux, FluxConfig  # noqa: E402
from test_convert import assert_same_tensors, folder_tensors  # noqa: E402
from test_mmdit import rel_err  # noqa: E402

# name -> (diffusers config, latent (H, W) unpacked NHWC, text length)
CONFIGS = {
    # FLUX.1-dev-like: guidance embedding; non-square latents.
    "dev": (dict(in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=12, pooled_projection_dim=10, guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
            (6, 10), 5),
    # FLUX.1-schnell-like: no guidance embedding; odd head count, tall latents.
    "schnell": (dict(in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=3,
                     joint_attention_dim=7, pooled_projection_dim=6, guidance_embeds=False, axes_dims_rope=(2, 2, 4)),
                (8, 4), 7),
    # Deeper, out_channels != in_channels, single-stream blocks only after two double ones.
    "deep": (dict(in_channels=12, out_channels=8, num_layers=3, num_single_layers=4, attention_head_dim=8,
                  num_attention_heads=2, joint_attention_dim=9, pooled_projection_dim=5, guidance_embeds=True,
                  axes_dims_rope=(2, 4, 2)), (4, 6), 3),
    # No double-stream blocks at all.
    "single_only": (dict(in_channels=4, num_layers=0, num_single_layers=2, attention_head_dim=8,
                         num_attention_heads=2, joint_attention_dim=6, pooled_projection_dim=4,
                         guidance_embeds=False, axes_dims_rope=(4, 2, 2)), (2, 2), 2),
}
# Realistic distilled guidance scales (FLUX.1-dev samples with 3.5): the embedding sees 1000 * guidance.
GUIDANCE = (3.5, 2.0, 4.0)


def make_reference(config, seed=0):
    torch.manual_seed(seed)
    model = diffusers.FluxTransformer2DModel(**config).eval()
    with torch.no_grad():  # AdaLN-Zero and the norms start at 0 / 1; randomise so every path matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def random_inputs(config, hw, text_len, batch, seed=1):
    g = np.random.default_rng(seed)
    x = g.standard_normal((batch, *hw, config["in_channels"] // 4)).astype(np.float32)
    # A different timestep per row; diffusers receives t / 1000 and multiplies by 1000: give both the same t.
    t = ((g.uniform(0, 1000, size=batch).astype(np.float32) / np.float32(1000)) * np.float32(1000))
    assert np.array_equal((t / np.float32(1000)) * np.float32(1000), t)
    ctx = g.standard_normal((batch, text_len, config["joint_attention_dim"])).astype(np.float32)
    pooled = g.standard_normal((batch, config["pooled_projection_dim"])).astype(np.float32)
    guidance = np.resize(np.asarray(GUIDANCE, np.float32), batch) if config.get("guidance_embeds") else None
    return x, t, ctx, pooled, guidance


@contextlib.contextmanager
def correctly_rounded_float32_exp():
    """torch.exp of float32 tensors computed in float64 and rounded once, while diffusers runs.

    diffusers' timestep embedding takes its frequencies from a float32 torch.exp, whose last bit depends on the
    CPU's vector unit (with AVX-512 here, 3 of 128 frequencies are one ulp off the correctly rounded value; it
    matched on the AVX2 machines this test was written on), and the arguments t x freq reach 1000 (3500 for
    FLUX.1-dev's guidance): that ulp moved the velocity by 1.2e-5 relative. flowjax's `timestep_embedding`
    rounds the exact exponential once; so does the reference under this patch (then 1.0e-6 dev, 3.4e-7 schnell),
    so the comparison does not depend on the machine.
    """
    exp = torch.exp

    def exact(x, *args, **kwargs):
        if isinstance(x, torch.Tensor) and x.dtype == torch.float32 and not args and not kwargs:
            return exp(x.double()).float()
        return exp(x, *args, **kwargs)

    torch.exp = exact
    try:
        yield
    finally:
        torch.exp = exp


def reference_velocity(model, x, t, ctx, pooled, guidance):
    """diffusers' velocity, called as FluxPipeline calls it (packed latents, t / 1000, ids), unpacked to NHWC,
    with a correctly rounded float32 exp (`correctly_rounded_float32_exp`)."""
    b, h, w, c = x.shape
    packed = diffusers.FluxPipeline._pack_latents(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), b, c, h, w)
    img_ids = diffusers.FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    with torch.no_grad(), correctly_rounded_float32_exp():
        out = model(hidden_states=packed, encoder_hidden_states=torch.from_numpy(ctx),
                    pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(t / np.float32(1000)),
                    img_ids=img_ids, txt_ids=torch.zeros(ctx.shape[1], 3),
                    guidance=None if guidance is None else torch.from_numpy(guidance)).sample
    # _unpack_latents(latents, height, width, vae_scale_factor) takes the pixel size: any factor, e.g. 8.
    return diffusers.FluxPipeline._unpack_latents(out, h * 8, w * 8, 8).numpy().transpose(0, 2, 3, 1)


_forward = nnx.jit(lambda model, *args: model(*args))  # compiled once per model and shapes


def ours_velocity(model, x, t, ctx, pooled, guidance):
    g = None if guidance is None else jnp.asarray(guidance)
    return np.asarray(_forward(model, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx), jnp.asarray(pooled), g))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (folder, reference model), each saved once for the module."""
    out = {}
    for name, (config, _, _) in CONFIGS.items():
        folder = tmp_path_factory.mktemp(name)  # cheap: a few ms per tiny model
        model = make_reference(config)
        model.save_pretrained(folder)
        out[name] = (folder, model)
    return out


FAST = ("dev", "schnell")  # the others run with --runslow


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in CONFIGS])
def test_velocity_parity(saved, name):
    config, hw, text_len = CONFIGS[name]
    folder, ref = saved[name]
    model = load_transformer(folder, dtype=jnp.float32)
    assert isinstance(model, Flux) and model.config.guidance_embeds == config["guidance_embeds"]
    inputs = random_inputs(config, hw, text_len, batch=3)
    want = reference_velocity(ref, *inputs)
    got = ours_velocity(model, *inputs)
    assert got.shape == want.shape == (3, *hw, model.config.out_channels // 4)
    err = rel_err(got, want)
    print(f"{name}: rel err {err:.2e}")
    assert err < 1e-5


@pytest.mark.slow
def test_rows_are_independent_and_remat_jit_match(saved):
    """Each row of a batch with different timesteps equals its batch-of-one result; a jitted remat bf16 model
    stays close to fp32."""
    config, hw, text_len = CONFIGS["dev"]
    folder = saved["dev"][0]
    model = load_transformer(folder, dtype=jnp.float32)
    x, t, ctx, pooled, g = random_inputs(config, hw, text_len, batch=3)
    full = ours_velocity(model, x, t, ctx, pooled, g)
    one = ours_velocity(model, x[1:2], t[1:2], ctx[1:2], pooled[1:2], g[1:2])
    np.testing.assert_allclose(full[1:2], one, rtol=1e-5, atol=1e-5)
    b16 = load_transformer(folder, dtype=jnp.bfloat16, remat="full")
    assert rel_err(ours_velocity(b16, x, t, ctx, pooled, g).astype(np.float32), full) < 5e-2


def test_round_trip_is_bit_identical(saved, tmp_path):
    """diffusers -> flowjax -> diffusers: the same tensors bit for bit, single and sharded files, fp32 and bf16;
    FluxTransformer2DModel.from_pretrained loads what we write."""
    folder, ref = saved["dev"]
    model = load_transformer(folder, dtype=jnp.float32)
    save_transformer(model, tmp_path / "single")
    assert_same_tensors(folder_tensors(folder), folder_tensors(tmp_path / "single"))
    assert json.loads((tmp_path / "single" / "config.json").read_text())["_class_name"] == "FluxTransformer2DModel"
    save_transformer(model, tmp_path / "shards", max_shard_bytes=20_000)
    assert (tmp_path / "shards" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    back = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "shards").eval()
    config, hw, text_len = CONFIGS["dev"]
    inputs = random_inputs(config, hw, text_len, batch=2)
    np.testing.assert_array_equal(reference_velocity(back, *inputs), reference_velocity(ref, *inputs))
    # bf16 files: stored exactly in fp32 and written back in bf16, the same bits; diffusers' sharded bf16 too.
    make_reference(config).to(torch.bfloat16).save_pretrained(tmp_path / "b16", max_shard_size="30KB")
    assert len(list((tmp_path / "b16").glob("*.safetensors"))) > 1
    save_transformer(load_transformer(tmp_path / "b16", dtype=jnp.float32), tmp_path / "b16_back",
                     dtype=jnp.bfloat16)
    assert_same_tensors(folder_tensors(tmp_path / "b16"), folder_tensors(tmp_path / "b16_back"))


def test_fsdp_loading_on_8_devices_matches(saved):
    assert jax.device_count() == 8, "conftest.py sets 8 simulated CPU devices"
    config, hw, text_len = CONFIGS["dev"]
    folder = saved["dev"][0]
    mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    sharded = load_transformer(folder, dtype=jnp.float32, mesh=mesh)
    kernel = sharded.single_blocks.blocks.proj_mlp.kernel[...]  # [layers, embed 32, mlp 128]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert kernel.addressable_shards[0].data.shape == (3, 32 // 8, 128)
    x, t, ctx, pooled, g = random_inputs(config, hw, text_len, batch=8)
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    args = [jax.device_put(jnp.asarray(a), batch) for a in (x, t, ctx, pooled, g)]
    got = _forward(sharded, *args)
    want = ours_velocity(load_transformer(folder, dtype=jnp.float32), x, t, ctx, pooled, g)
    assert rel_err(np.asarray(got), want) < 1e-5


def test_guidance_and_shape_errors(saved):
    dev = load_transformer(saved["dev"][0], dtype=jnp.float32)
    schnell = load_transformer(saved["schnell"][0], dtype=jnp.float32)
    config, hw, text_len = CONFIGS["dev"]
    x, t, ctx, pooled, g = (None if a is None else jnp.asarray(a) for a in random_inputs(config, hw, text_len, 2))
    with pytest.raises(ValueError, match="guidance_embeds, FLUX.1-dev.*pass guidance"):
        dev(x, t, ctx, pooled)
    with pytest.raises(ValueError, match="even H and W"):
        dev(x[:, :5], t, ctx, pooled, g)
    with pytest.raises(ValueError, match="timesteps must have shape"):
        dev(x, t[:1], ctx, pooled, g)
    config, hw, text_len = CONFIGS["schnell"]
    x, t, ctx, pooled, _ = (None if a is None else jnp.asarray(a) for a in random_inputs(config, hw, text_len, 2))
    with pytest.raises(ValueError, match="no guidance embedding.*guidance=None"):
        schnell(x, t, ctx, pooled, jnp.ones(2))


def test_config_validation_and_folder_errors(saved, tmp_path):
    with pytest.raises(ValueError, match="must sum to attention_head_dim"):
        FluxConfig(attention_head_dim=16, axes_dims_rope=(4, 4, 4))
    with pytest.raises(ValueError, match="patch_size"):
        FluxConfig(patch_size=2)
    with pytest.raises(ValueError, match="multiple of 4"):
        FluxConfig(in_channels=6)
    with pytest.raises(ValueError, match="unknown FluxTransformer2DModel config keys"):
        FluxConfig.from_diffusers({"_class_name": "FluxTransformer2DModel", "not_a_key": 1})
    folder = saved["schnell"][0]
    shutil.copytree(folder, tmp_path / "bad")
    raw = json.loads((folder / "config.json").read_text())
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**raw, "axes_dims_rope": [2, 2, 2]}))
    with pytest.raises(CheckpointError, match="config.json: invalid FLUX config.*axes_dims_rope"):
        load_transformer(tmp_path / "bad")
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**raw, "num_single_layers": 3}))
    with pytest.raises(CheckpointError, match="single_transformer_blocks.2.attn.to_q.weight"):
        load_transformer(tmp_path / "bad")
