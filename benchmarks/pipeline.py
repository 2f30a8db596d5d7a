"""Rollout images/s: flowjax's SD3Pipeline against diffusers' StableDiffusion3Pipeline on the same device.

  python benchmarks/pipeline.py                                    # tiny SD3 config, float32, CPU
  python benchmarks/pipeline.py --config=sd35-medium --dtype=bfloat16 --resolution=512 --batch=8 --steps=40

Both pipelines get the same random weights (diffusers' models, every weight perturbed, saved as a diffusers
folder and read back by flowjax's converters), the same prompt embeddings and the same initial noise, and
run what an RL rollout runs: the CFG ODE sampler over the scheduler's shifted sigmas, then the VAE decode
(prompt encoding is outside the loop: rollouts reuse a prompt's embeddings; diffusers is given
`prompt_embeds=`). Prints each side's images/s (median of --iters timed calls after one warm-up call that
compiles), the speed-up and the largest difference between their images, which checks that both did the
same work. Shapes from flowjax.models.presets; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from flowjax.models import presets
from flowjax.models.vae import VAEConfig

CONFIGS = {name: (cfg, presets.PRESET_VAES.get(name, presets.SD3_VAE)) for name, cfg in presets.TRANSFORMERS.items()}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
CLIP_TOKENS = 77  # SD3's CLIP tokens, followed by --t5-tokens T5 tokens in the prompt embeddings


def _timed(fn, iters: int) -> float:
    """Median seconds of `fn()` (which waits for its result) over `iters` calls after a warm-up call."""
    fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def diffusers_models(name: str, torch_dtype, device, seed: int = 0):
    """diffusers' SD3 transformer and VAE of preset `name` with random weights, each perturbed by 0.02 x N(0, 1)
    (so that zero-initialised modulations and outputs matter too)."""
    import diffusers
    import torch

    transformer_cfg, vae_cfg = CONFIGS[name]
    torch.manual_seed(seed)
    models = (diffusers.SD3Transformer2DModel(**transformer_cfg), diffusers.AutoencoderKL(**vae_cfg))
    with torch.no_grad():
        for model in models:
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
    return tuple(m.to(device, torch_dtype).eval() for m in models)


def inputs(name: str, batch: int, resolution: int, t5_tokens: int, seed: int = 0) -> dict:
    """Prompt and negative embeddings (CLIP + T5 tokens, as SD3Pipeline.encode_prompt shapes them) and NHWC noise."""
    transformer_cfg, vae_cfg = CONFIGS[name]
    rng = np.random.default_rng(seed)
    ctx = (batch, CLIP_TOKENS + t5_tokens, transformer_cfg["joint_attention_dim"])
    pooled = (batch, transformer_cfg["pooled_projection_dim"])
    latent = resolution // VAEConfig.from_diffusers(vae_cfg).downsample_factor
    draw = lambda shape: rng.standard_normal(shape, np.float32)
    return dict(ctx=draw(ctx), pooled=draw(pooled), neg_ctx=draw(ctx), neg_pooled=draw(pooled),
                noise=draw((batch, latent, latent, transformer_cfg["in_channels"])))


def run(config: str = "sd3-tiny", *, dtype: str = "float32", resolution: int = 128, batch: int = 2, steps: int = 40,
        guidance: float = 4.5, t5_tokens: int = 256, shift: float = 3.0, attention: str = "xla", iters: int = 3,
        compare: bool = True) -> dict:
    """{"flowjax": images/s, "diffusers": images/s, "max_abs_diff": largest |image difference| in [0, 1] units}."""
    import torch

    from flowjax.convert.transformer import load_transformer
    from flowjax.convert.vae import load_vae
    from flowjax.pipeline import SD3Pipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    transformer, vae = diffusers_models(config, torch_dtype, device)
    x = inputs(config, batch, resolution, t5_tokens)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        transformer.save_pretrained(Path(tmp) / "transformer")
        vae.save_pretrained(Path(tmp) / "vae")
        ours = SD3Pipeline(
            transformer=load_transformer(Path(tmp) / "transformer", dtype=DTYPES[dtype], attention_impl=attention),
            vae=load_vae(Path(tmp) / "vae", dtype=DTYPES[dtype]), shift=shift, dtype=DTYPES[dtype])
    if not compare:  # free the device for flowjax alone
        del transformer, vae

    cond = [jnp.asarray(x[k], DTYPES[dtype]) for k in ("ctx", "pooled", "neg_ctx", "neg_pooled")]
    noise = jnp.asarray(x["noise"])

    def flowjax_rollout():
        latents = ours.denoise(noise, *cond, num_steps=steps, guidance_scale=guidance)
        return np.asarray(jax.block_until_ready(ours.decode(latents)))

    out["flowjax"] = batch / _timed(flowjax_rollout, iters)
    if compare:
        import diffusers

        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
        theirs = diffusers.StableDiffusion3Pipeline(
            transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=None, tokenizer=None,
            text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
        theirs.set_progress_bar_config(disable=True)
        t = {k: torch.from_numpy(x[k]).to(device, torch_dtype) for k in ("ctx", "pooled", "neg_ctx", "neg_pooled")}
        latents = torch.from_numpy(x["noise"].transpose(0, 3, 1, 2).copy()).to(device, torch_dtype)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        def diffusers_rollout():
            with torch.inference_mode():
                images = theirs(prompt_embeds=t["ctx"], pooled_prompt_embeds=t["pooled"],
                                negative_prompt_embeds=t["neg_ctx"], negative_pooled_prompt_embeds=t["neg_pooled"],
                                latents=latents, num_inference_steps=steps, guidance_scale=guidance,
                                height=resolution, width=resolution, output_type="pt").images
            sync()
            return images.float().cpu().numpy().transpose(0, 2, 3, 1)

        out["diffusers"] = batch / _timed(diffusers_rollout, iters)
        out["max_abs_diff"] = float(np.abs(flowjax_rollout() - diffusers_rollout()).max())
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="sd3-tiny", choices=sorted(CONFIGS))
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype of both pipelines")
    parser.add_argument("--resolution", type=int, default=128, help="image pixels a side")
    parser.add_argument("--batch", type=int, default=2, help="images per call")
    parser.add_argument("--steps", type=int, default=40, help="sampler steps (SD3.5 GenEval evaluation: 40)")
    parser.add_argument("--guidance", type=float, default=4.5, help="CFG scale (one batched call on both)")
    parser.add_argument("--t5-tokens", type=int, default=256, help="T5 tokens after the 77 CLIP tokens")
    parser.add_argument("--attention", choices=["xla", "cudnn", "chunked"], default="xla", help="flowjax's attention")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--no-compare", action="store_true", help="time flowjax only (no torch models kept)")
    a = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind} | {a.config} | {a.resolution}px x {a.batch} | {a.steps} steps, "
          f"CFG {a.guidance} | {a.dtype} | attention {a.attention}", flush=True)
    r = run(a.config, dtype=a.dtype, resolution=a.resolution, batch=a.batch, steps=a.steps, guidance=a.guidance,
            t5_tokens=a.t5_tokens, attention=a.attention, iters=a.iters, compare=not a.no_compare)
    print(f"flowjax SD3Pipeline        {r['flowjax']:8.3f} images/s")
    if "diffusers" in r:
        print(f"diffusers SD3 pipeline     {r['diffusers']:8.3f} images/s")
        print(f"speed-up x{r['flowjax'] / r['diffusers']:.2f}; largest image difference {r['max_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
