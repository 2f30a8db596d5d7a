"""Whole-pipeline parity of `flowjax.pipeline.FluxPipeline` with diffusers' FluxPipeline on tiny random FLUX.1-dev
and -schnell shaped pipelines saved with `save_pretrained` and loaded back (fp32, CPU): prompt encoding, images with
distilled guidance, with true CFG, non-square, schnell's fixed schedule; the errors a user meets; serving both
pipelines from `flowjax.sample`."""

import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
import cli_runs  # noqa: E402
from test_pipeline import MAX_SEQ, NEGATIVE, PROMPTS, rel_err  # noqa: E402
from tiny_flux import save_tiny_flux  # noqa: E402

from flowjax import sample as sample_lib  # noqa: E402
from flowjax.convert import CheckpointError  # noqa: E402
from flowjax.models.flux import pack_latents, unpack_latents  # noqa: E402
from flowjax.pipeline import FluxPipeline, SD3Pipeline, load_pipeline  # noqa: E402

NUM_STEPS = 3


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_flux")
    return {"dev": save_tiny_flux(root / "dev", dev=True), "schnell": save_tiny_flux(root / "schnell", seed=1,
                                                                                     dev=False)}


@pytest.fixture(scope="module")
def ours(folders):
    return {name: FluxPipeline.from_pretrained(path, dtype=jnp.float32) for name, path in folders.items()}


@pytest.fixture(scope="module")
def reference(folders):
    transformers.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    out = {}
    for name, path in folders.items():
        out[name] = diffusers.FluxPipeline.from_pretrained(path)
        out[name].set_progress_bar_config(disable=True)
    return out


def test_loaded_settings(ours):
    dev, schnell = ours["dev"], ours["schnell"]
    assert dev.scheduler["use_dynamic_shifting"] and dev.scheduler["base_image_seq_len"] == 16
    assert not schnell.scheduler["use_dynamic_shifting"] and schnell.scheduler["shift"] == 1.0
    assert (dev.vae_scale_factor, dev.latent_channels, dev.tokenizer_max_length, dev.size_multiple) == (2, 4, 77, 4)
    assert dev.vae.config.scaling_factor == 0.3611 and dev.vae.config.shift_factor == 0.1159
    assert dev.transformer.config.guidance_embeds and not schnell.transformer.config.guidance_embeds
    assert dev.model_guidance(2, 3.5).tolist() == [3.5, 3.5] and schnell.model_guidance(2, 3.5) is None


def test_encode_prompt_matches_diffusers(ours, reference):
    got = ours["dev"].encode_prompt(PROMPTS, NEGATIVE, max_sequence_length=MAX_SEQ, do_true_cfg=True)
    want = []
    for texts in (PROMPTS, [NEGATIVE] * 2):
        with torch.no_grad():
            ctx, pooled, text_ids = reference["dev"].encode_prompt(texts, None, device="cpu",
                                                                   max_sequence_length=MAX_SEQ)
        assert not text_ids.any()  # FLUX's text position ids are zero, as flowjax.models.flux builds them
        want.append((ctx.numpy(), pooled.numpy()))
    want = [want[0][0], want[0][1], want[1][0], want[1][1]]
    assert [g.shape for g in got] == [w.shape for w in want] == [(2, MAX_SEQ, 32), (2, 12)] * 2
    errs = [rel_err(g, w) for g, w in zip(got, want)]
    print("encode_prompt rel errors: ctx, pooled, neg_ctx, neg_pooled = " + ", ".join(f"{e:.1e}" for e in errs))
    assert max(errs) < 1e-5
    assert ours["dev"].encode_prompt(PROMPTS, NEGATIVE, max_sequence_length=MAX_SEQ)[2:] == (None, None)


# (pipeline, height, width, guidance_scale, true_cfg_scale)
CASES = {
    "dev_true_cfg_non_square": ("dev", 24, 40, 3.5, 2.5),
    "schnell": ("schnell", 32, 24, 0.0, 1.0),
    "dev": ("dev", 32, 32, 3.5, 1.0),
    "dev_low_guidance": ("dev", 40, 24, 1.5, 1.0),
}
FAST = ("dev_true_cfg_non_square", "schnell")  # the others run with --runslow


@pytest.mark.parametrize("case", [c if c in FAST else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_images_match_diffusers(ours, reference, case):
    name, height, width, guidance, true_cfg = CASES[case]
    pipe, ref = ours[name], reference[name]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn((len(PROMPTS), 4, height // 2, width // 2), generator=g)  # NCHW latents
    nhwc = noise.numpy().transpose(0, 2, 3, 1)
    packed = torch.from_numpy(np.array(pack_latents(jnp.asarray(nhwc))))  # what diffusers' latents= takes
    np.testing.assert_array_equal(packed.numpy(), diffusers.FluxPipeline._pack_latents(noise, 2, 4, height // 2,
                                                                                       width // 2).numpy())
    kw = dict(guidance_scale=guidance, height=height, width=width, max_sequence_length=MAX_SEQ)
    neg = dict(negative_prompt=NEGATIVE, true_cfg_scale=true_cfg) if true_cfg > 1 else {}
    with torch.no_grad():
        want = ref(PROMPTS, num_inference_steps=NUM_STEPS, latents=packed, output_type="np", **neg, **kw).images
        want_latents = ref(PROMPTS, num_inference_steps=NUM_STEPS, latents=packed, output_type="latent", **neg,
                           **kw).images.numpy()
    got = np.asarray(pipe(PROMPTS, num_steps=NUM_STEPS, latents=nhwc, **neg, **kw))
    assert got.shape == want.shape == (len(PROMPTS), height, width, 3) and got.dtype == np.float32
    # The images must not be flat or saturated, or the comparison would say little.
    assert want.std() > 0.05 and np.mean((want > 0.0) & (want < 1.0)) > 0.9
    ctx, pooled, neg_ctx, neg_pooled = pipe.encode_prompt(PROMPTS, neg.get("negative_prompt"), MAX_SEQ,
                                                          do_true_cfg=true_cfg > 1)
    got_latents = pipe.denoise(nhwc, ctx, pooled, neg_ctx, neg_pooled, num_steps=NUM_STEPS, guidance_scale=guidance,
                               true_cfg_scale=true_cfg)
    want_latents = np.asarray(unpack_latents(jnp.asarray(want_latents), height // 2, width // 2))
    pixel_diff = float(np.abs(got - want).max())
    lat_err = rel_err(got_latents, want_latents)
    print(f"{case}: max abs pixel difference {pixel_diff:.1e}, latent rel error {lat_err:.1e}")
    assert pixel_diff < 1e-5
    assert lat_err < 1e-5


def test_schedule_follows_the_scheduler(ours, reference):
    """The pipeline's sigmas are diffusers' for its scheduler config and image size (mu from the token count)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for name, (height, width) in (("dev", (32, 32)), ("dev", (64, 16)), ("schnell", (32, 24))):
        scheduler = reference[name].scheduler
        cfg = scheduler.config
        mu = calculate_shift((height // 4) * (width // 4), cfg.base_image_seq_len, cfg.max_image_seq_len,
                             cfg.base_shift, cfg.max_shift)
        scheduler.set_timesteps(5, sigmas=np.linspace(1.0, 1 / 5, 5), mu=mu)
        np.testing.assert_array_equal(np.asarray(ours[name].sigmas(5, height, width)), scheduler.sigmas.numpy())


def test_bad_sizes_and_inputs(ours):
    pipe = ours["dev"]
    with pytest.raises(ValueError, match=r"multiples of vae_scale_factor \* 2 \(the 2x2 latent packing\) = 4.*32x28"):
        pipe(PROMPTS, height=34, width=30)
    with pytest.raises(ValueError, match=r"latents must be NHWC \(2, 16, 16, 4\).*unpack_latents"):
        pipe(PROMPTS, height=32, width=32, latents=np.zeros((2, 64, 16), np.float32))
    ctx, pooled, _, _ = pipe.encode_prompt(PROMPTS, max_sequence_length=MAX_SEQ)
    with pytest.raises(ValueError, match="true_cfg_scale > 1 needs neg_ctx"):
        pipe.denoise(np.zeros((2, 8, 8, 4), np.float32), ctx, pooled, true_cfg_scale=2.0)
    with pytest.raises(ValueError, match="max_sequence_length"):
        pipe.encode_prompt(PROMPTS, max_sequence_length=513)


def test_folder_errors_and_dispatch(folders, ours, tmp_path):
    with pytest.raises(CheckpointError, match="'FluxPipeline', not a StableDiffusion3Pipeline.*FluxPipeline"):
        SD3Pipeline.from_pretrained(folders["dev"])
    with pytest.raises(CheckpointError, match="single FluxTransformer2DModel folder.*pipeline folder above it"):
        FluxPipeline.from_pretrained(folders["dev"] / "transformer")
    broken = Path(shutil.copytree(folders["schnell"], tmp_path / "copy"))
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(CheckpointError, match="missing component folder .*text_encoder_2"):
        FluxPipeline.from_pretrained(broken)
    shutil.copytree(folders["schnell"] / "text_encoder_2", broken / "text_encoder_2")
    cfg = json.loads((broken / "scheduler" / "scheduler_config.json").read_text())
    (broken / "scheduler" / "scheduler_config.json").write_text(json.dumps({**cfg, "use_karras_sigmas": True}))
    with pytest.raises(CheckpointError, match="use_karras_sigmas"):
        FluxPipeline.from_pretrained(broken)
    # load_pipeline reads model_index.json and picks the class.
    assert isinstance(load_pipeline(folders["schnell"], dtype=jnp.float32), FluxPipeline)
    # A FLUX transformer does not fit an SD3 pipeline object and the reverse.
    with pytest.raises(CheckpointError, match="not an SD3 MMDiT"):
        SD3Pipeline(transformer=ours["dev"].transformer, vae=None, text_encoder=None, text_encoder_2=None,
                    tokenizer=None, tokenizer_2=None)


def test_sample_generate_serves_flux(ours, tmp_path):
    """flowjax.sample.generate with a FLUX pipeline: prompt i's image from row i of key(seed)'s noise."""
    from PIL import Image

    pipe = ours["schnell"]
    kw = dict(num_steps=NUM_STEPS, height=32, width=24, max_sequence_length=MAX_SEQ)  # compiled by the image test
    paths = sample_lib.generate(None, ["a cat", "the dog"], tmp_path / "out", batch_size=2, seed=3, pipe=pipe, **kw)
    assert [p.name for p in paths] == ["0000_a_cat.png", "0001_the_dog.png"]
    noise = pipe.prepare_latents(2, 32, 24, key=jax.random.key(3))
    want = np.asarray(pipe(["a cat", "the dog"], latents=noise, **kw))
    for p, w in zip(paths, want):
        got = np.asarray(Image.open(p), np.int16)
        assert np.abs(got - np.round(w * 255)).max() <= 1


@pytest.mark.slow
def test_sample_cli_with_a_flux_folder(folders, tmp_path):
    from PIL import Image

    res = cli_runs.run("-m", "flowjax.sample", f"--model={folders['dev']}", "--prompt=a photo of a dog",
                       "--num_steps=2", "--height=24", "--width=32", "--max_sequence_length=8", "--dtype=float32",
                       "--guidance_scale=3.5", f"--out={tmp_path / 'out'}")
    (path,) = [Path(line) for line in res.stdout.split()]
    with Image.open(path) as im:
        assert im.size == (32, 24) and im.mode == "RGB"
