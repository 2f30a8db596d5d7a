"""Whole-pipeline parity of `flowjax.pipeline.SD3Pipeline` with diffusers' StableDiffusion3Pipeline on a tiny
random SD3.5-shaped pipeline (fp32, CPU): prompt encoding with and without T5, images with and without CFG, a
non-square size; the errors a user meets; `python -m flowjax.sample`."""

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from tiny_sd3 import save_tiny_sd3  # noqa: E402

from flowjax import pipeline as pipeline_lib  # noqa: E402
from flowjax import sample as sample_lib  # noqa: E402
from flowjax.convert import CheckpointError  # noqa: E402
from flowjax.pipeline import SD3Pipeline  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of the cat on a mat", "A blue dog, zebra!"]
NEGATIVE = "blurry ugly"
MAX_SEQ = 16  # T5 tokens: the default 256 works too, a short one keeps the test fast
NUM_STEPS = 4


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_sd3(tmp_path_factory.mktemp("tiny") / "sd3")


@pytest.fixture(scope="module")
def ours(folder):
    return SD3Pipeline.from_pretrained(folder, dtype=jnp.float32)


@pytest.fixture(scope="module")
def ours_no_t5(folder):
    return SD3Pipeline.from_pretrained(folder, dtype=jnp.float32, text_encoder_3=False)


@pytest.fixture(scope="module")
def reference(folder):
    transformers.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    no_t5 = diffusers.StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    no_t5.set_progress_bar_config(disable=True)
    return {True: pipe, False: no_t5}


def test_loaded_settings(ours, ours_no_t5):
    assert ours.shift == 3.0
    assert (ours.vae_scale_factor, ours.patch_size, ours.latent_channels, ours.tokenizer_max_length) == (2, 2, 4, 77)
    assert ours.text_encoder_3 is not None and ours_no_t5.text_encoder_3 is None and ours_no_t5.tokenizer_3 is None


@pytest.mark.parametrize("with_t5", [True, False], ids=["t5", "no_t5"])
def test_encode_prompt_matches_diffusers(ours, ours_no_t5, reference, with_t5):
    pipe = ours if with_t5 else ours_no_t5
    got = pipe.encode_prompt(PROMPTS, negative_prompt=NEGATIVE, max_sequence_length=MAX_SEQ)
    with torch.no_grad():
        pe, npe, pp, npp = reference[with_t5].encode_prompt(
            PROMPTS, None, None, negative_prompt=NEGATIVE, max_sequence_length=MAX_SEQ, device="cpu")
    want = [t.numpy() for t in (pe, pp, npe, npp)]
    assert [g.shape for g in got] == [w.shape for w in want] == [(2, 77 + MAX_SEQ, 32), (2, 20)] * 2
    errs = [rel_err(g, w) for g, w in zip(got, want)]
    print(f"encode_prompt rel errors ({'t5' if with_t5 else 'no t5'}): ctx, pooled, neg_ctx, neg_pooled = "
          + ", ".join(f"{e:.1e}" for e in errs))
    assert max(errs) < 1e-5
    ctx = np.asarray(got[0])
    assert np.all(ctx[:, :77, 28:] == 0)  # CLIP-L 12 + CLIP-G 16 features, zero-padded to the T5 width 32
    assert np.all(ctx[:, 77:] == 0) != with_t5  # zeros in place of T5 without it
    # A list of negatives, one per prompt; no negatives without guidance.
    per_prompt = pipe.encode_prompt(PROMPTS, negative_prompt=[NEGATIVE, NEGATIVE], max_sequence_length=MAX_SEQ)
    np.testing.assert_array_equal(per_prompt[2], got[2])
    assert pipe.encode_prompt(PROMPTS, max_sequence_length=MAX_SEQ, do_classifier_free_guidance=False)[2:] == (None,
                                                                                                              None)


# (guidance, height, width, with T5)
CASES = {
    "no_cfg": (1.0, 32, 32, True),
    "cfg": (3.0, 32, 32, True),
    "cfg_non_square": (3.0, 24, 40, True),
    "cfg_no_t5": (3.0, 32, 32, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_images_match_diffusers(ours, ours_no_t5, reference, case):
    guidance, height, width, with_t5 = CASES[case]
    pipe, ref = (ours if with_t5 else ours_no_t5), reference[with_t5]
    g = torch.Generator().manual_seed(0)
    latents = torch.randn((len(PROMPTS), 4, height // 2, width // 2), generator=g)
    kw = dict(negative_prompt=NEGATIVE, guidance_scale=guidance, height=height, width=width,
              max_sequence_length=MAX_SEQ)
    with torch.no_grad():
        want = ref(PROMPTS, num_inference_steps=NUM_STEPS, latents=latents, output_type="np", **kw).images
        want_latents = ref(PROMPTS, num_inference_steps=NUM_STEPS, latents=latents, output_type="latent",
                           **kw).images.numpy().transpose(0, 2, 3, 1)
    got = np.asarray(pipe(PROMPTS, num_steps=NUM_STEPS, latents=latents.numpy().transpose(0, 2, 3, 1), **kw))
    assert got.shape == want.shape == (len(PROMPTS), height, width, 3) and got.dtype == np.float32
    assert 0.0 <= got.min() and got.max() <= 1.0
    # The images must not be flat or saturated, or the comparison would say little.
    assert want.std() > 0.05 and np.mean((want > 0.0) & (want < 1.0)) > 0.9
    ctx, pooled, neg_ctx, neg_pooled = pipe.encode_prompt(PROMPTS, NEGATIVE, MAX_SEQ,
                                                          do_classifier_free_guidance=guidance > 1)
    got_latents = pipe.denoise(latents.numpy().transpose(0, 2, 3, 1), ctx, pooled, neg_ctx, neg_pooled,
                               num_steps=NUM_STEPS, guidance_scale=guidance)
    pixel_diff = float(np.abs(got - want).max())
    lat_err = rel_err(got_latents, want_latents)
    print(f"{case}: max abs pixel difference {pixel_diff:.1e}, latent rel error {lat_err:.1e}")
    assert pixel_diff < 1e-5
    assert lat_err < 1e-5


def test_noise_from_key(ours):
    kw = dict(num_steps=NUM_STEPS, guidance_scale=3.0, height=32, width=32, max_sequence_length=MAX_SEQ,
              negative_prompt=NEGATIVE)
    a = np.asarray(ours(PROMPTS, **kw))
    b = np.asarray(ours(PROMPTS, key=jax.random.key(0), **kw))
    c = np.asarray(ours(PROMPTS, key=jax.random.key(1), **kw))
    np.testing.assert_array_equal(a, b)  # the default key is key(0)
    assert np.abs(a - c).max() > 1e-3
    noise = ours.prepare_latents(2, 32, 32, key=jax.random.key(0))
    np.testing.assert_array_equal(a, np.asarray(ours(PROMPTS, latents=noise, **kw)))


def test_sharded_load_matches(folder, ours):
    """Weights loaded straight into an FSDP mesh over the 8 simulated devices give the same images."""
    from flowjax import sharding

    mesh = sharding.make_mesh({"data": 2, "fsdp": -1, "tensor": 1}, jax.devices()[:4])
    sharded = SD3Pipeline.from_pretrained(folder, dtype=jnp.float32, mesh=mesh)
    kernel = sharded.transformer.context_embedder.kernel[...]
    assert kernel.sharding.mesh.shape["fsdp"] == 2 and len(kernel.sharding.device_set) == 4
    kw = dict(num_steps=NUM_STEPS, guidance_scale=3.0, height=32, width=32, max_sequence_length=MAX_SEQ,
              negative_prompt=NEGATIVE)
    np.testing.assert_allclose(np.asarray(sharded(PROMPTS, **kw)), np.asarray(ours(PROMPTS, **kw)), atol=1e-5)


def test_bad_sizes_and_inputs(ours):
    with pytest.raises(ValueError, match="multiples of vae_scale_factor \\* patch_size = 4.*32x28"):
        ours(PROMPTS, height=34, width=30)
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        ours(PROMPTS, height=128, width=32)
    with pytest.raises(ValueError, match="latents must be NHWC \\(2, 16, 16, 4\\).*transpose"):
        ours(PROMPTS, height=32, width=32, latents=np.zeros((2, 4, 16, 16), np.float32))
    with pytest.raises(ValueError, match="negative_prompt has 3 entries but there are 2 prompts"):
        ours.encode_prompt(PROMPTS, negative_prompt=["a", "b", "c"])
    with pytest.raises(ValueError, match="max_sequence_length"):
        ours.encode_prompt(PROMPTS, max_sequence_length=513)
    with pytest.raises(ValueError, match="empty"):
        ours([])


def test_without_text_encoders_it_samples_from_given_embeddings(ours):
    """No encoders (diffusers' pipeline with prompt_embeds=): denoise + decode give the full pipeline's images;
    encode_prompt and __call__ say why they cannot run; half a set of encoders is refused."""
    bare = SD3Pipeline(transformer=ours.transformer, vae=ours.vae, shift=ours.shift, dtype=ours.dtype)
    ctx, pooled, neg_ctx, neg_pooled = ours.encode_prompt(PROMPTS, NEGATIVE, MAX_SEQ)
    noise = ours.prepare_latents(2, 32, 32, key=jax.random.key(1))
    images = [pipe.decode(pipe.denoise(noise, ctx, pooled, neg_ctx, neg_pooled, num_steps=NUM_STEPS))
              for pipe in (ours, bare)]
    np.testing.assert_array_equal(np.asarray(images[1]), np.asarray(images[0]))
    with pytest.raises(ValueError, match="no text encoders.*denoise"):
        bare(PROMPTS, height=32, width=32)
    with pytest.raises(ValueError, match="both CLIP text encoders and their tokenizers"):
        SD3Pipeline(transformer=ours.transformer, vae=ours.vae, text_encoder=ours.text_encoder,
                    tokenizer=ours.tokenizer)


def _copy(folder, tmp_path):
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def test_folder_errors(folder, tmp_path):
    with pytest.raises(CheckpointError, match="is not a folder.*model_index.json"):
        SD3Pipeline.from_pretrained(folder / "model_index.json")
    with pytest.raises(CheckpointError, match="single SD3Transformer2DModel folder.*pipeline folder above it"):
        SD3Pipeline.from_pretrained(folder / "transformer")
    broken = _copy(folder, tmp_path)
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(CheckpointError, match="'FluxPipeline', not a StableDiffusion3Pipeline"):
        SD3Pipeline.from_pretrained(broken)
    (broken / "model_index.json").unlink()
    with pytest.raises(CheckpointError, match="no model_index.json.*copy it from the model repository"):
        SD3Pipeline.from_pretrained(broken)


def test_missing_component_and_tokenizer(folder, tmp_path):
    broken = _copy(folder, tmp_path)
    shutil.rmtree(broken / "vae")
    with pytest.raises(CheckpointError, match="missing component folder .*vae"):
        SD3Pipeline.from_pretrained(broken)
    shutil.copytree(folder / "vae", broken / "vae")
    for f in (broken / "tokenizer_2").iterdir():
        f.unlink()
    with pytest.raises(CheckpointError, match="no tokenizer files in .*tokenizer_2.*tokenizer.json, or vocab.json"):
        SD3Pipeline.from_pretrained(broken)
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(CheckpointError, match="missing component folder .*tokenizer_2"):
        SD3Pipeline.from_pretrained(broken)
    shutil.copytree(folder / "tokenizer_2", broken / "tokenizer_2")
    shutil.rmtree(broken / "tokenizer_3")
    with pytest.raises(CheckpointError, match="tokenizer_3.*text_encoder_3=False"):
        SD3Pipeline.from_pretrained(broken)
    cfg = json.loads((broken / "scheduler" / "scheduler_config.json").read_text())
    (broken / "scheduler" / "scheduler_config.json").write_text(json.dumps({**cfg, "use_dynamic_shifting": True}))
    with pytest.raises(CheckpointError, match="use_dynamic_shifting"):
        SD3Pipeline.from_pretrained(broken, text_encoder_3=False)


def test_pipeline_saved_without_t5(tmp_path):
    path = save_tiny_sd3(tmp_path / "no_t5", seed=1, with_t5=False)
    assert json.loads((path / "model_index.json").read_text())["text_encoder_3"] == [None, None]
    pipe = SD3Pipeline.from_pretrained(path, dtype=jnp.float32)
    assert pipe.text_encoder_3 is None
    ctx, _, _, _ = pipe.encode_prompt(PROMPTS, max_sequence_length=MAX_SEQ)
    assert ctx.shape == (2, 77 + MAX_SEQ, 32) and np.all(np.asarray(ctx)[:, 77:] == 0)


def test_transformers_missing_names_the_extra(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'flowjax\[pipeline\]'"):
        pipeline_lib.load_tokenizer(folder / "tokenizer", "clip")


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["JAX_PLATFORMS"] = "cpu"
    return env


def test_no_torch_import():
    code = "import sys, flowjax.pipeline, flowjax.sample; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], env=_env(), check=True, timeout=120)


def test_sample_cli_writes_pngs(folder, tmp_path):
    from PIL import Image

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("# a comment\nthe red cat\n\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "flowjax.sample", f"--model={folder}", "--prompt=a photo of a dog",
           f"--prompts_file={prompts_file}", "--num_steps=2", "--height=24", "--width=32", "--max_sequence_length=8",
           "--dtype=float32", "--seed=3", f"--out={out}"]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    paths = [Path(line) for line in res.stdout.split()]
    assert [p.name for p in paths] == ["0000_a_photo_of_a_dog.png", "0001_the_red_cat.png"]
    for p in paths:
        with Image.open(p) as im:
            assert im.size == (32, 24) and im.mode == "RGB"
    usage = subprocess.run([sys.executable, "-m", "flowjax.sample", "--help"], env=_env(), capture_output=True,
                           text=True, timeout=120).stdout  # absl's --help exits with status 1
    assert all(f"--{flag}:" in usage for flag in ("model", "prompt", "prompts_file", "lora", "dtype", "out"))


def test_sample_generate_with_lora_and_batches(ours, tmp_path, monkeypatch):
    """--lora goes through flowjax.convert.lora.load_lora(transformer, path); prompt i's noise is the i-th row of
    the noise of key(seed), whatever the batching (the last batch is padded to the batch size)."""
    from PIL import Image

    calls = []
    fake = types.ModuleType("flowjax.convert.lora")
    fake.load_lora = lambda model, path: calls.append((model, path)) or ["stacks.0.blocks.attn.to_q"]
    monkeypatch.setitem(sys.modules, "flowjax.convert.lora", fake)
    kw = dict(num_steps=NUM_STEPS, guidance_scale=3.0, height=32, width=32, max_sequence_length=MAX_SEQ,
              negative_prompt=NEGATIVE)
    prompts = ["a cat", "a dog", "the mat"]
    paths = sample_lib.generate(None, prompts, tmp_path / "out", batch_size=2, lora="adapter.safetensors", seed=5,
                                pipe=ours, **kw)
    assert calls == [(ours.transformer, "adapter.safetensors")]
    assert [p.name for p in paths] == ["0000_a_cat.png", "0001_a_dog.png", "0002_the_mat.png"]
    noise = ours.prepare_latents(3, 32, 32, key=jax.random.key(5))
    want = np.asarray(ours(prompts[1:], latents=noise[1:], **kw))
    for p, w in zip(paths[1:], want):
        got = np.asarray(Image.open(p), np.int16)
        assert np.abs(got - np.round(w * 255)).max() <= 1
