"""Micro-benchmark of the flowjax transformers (SD3 MMDiT, FLUX.1): forward and forward+backward, tokens/s and
achieved TFLOP/s.

  python benchmarks/mmdit.py                          # tiny MMDiT config (CPU friendly); flux-tiny for FLUX
  python benchmarks/mmdit.py --config=sd35-medium --resolution=512 --batch=4   # on a GPU
  python benchmarks/mmdit.py --config=flux-dev --resolution=1024 --batch=1     # FLUX.1-dev (flux-schnell: no guidance)
  python benchmarks/mmdit.py --config=path/to/transformer/config.json          # SD3 or FLUX, by its _class_name
  python benchmarks/mmdit.py --compare-torch          # also time diffusers on the same config (CPU/GPU)

Weights are random (nothing is downloaded). FLOPs are the model's matmul FLOPs counted analytically
(projections, attention, MLPs, modulation); forward+backward counts 3x the forward.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowjax.convert.transformer import FAMILIES, family_of_config
from flowjax.models import presets
from flowjax.models.flux import FluxConfig
from flowjax.models.mmdit import MMDiTConfig

# The published transformers' config.json (flowjax.models.presets), "tiny" = presets.SD3_TINY.
PRESETS = {**presets.TRANSFORMERS, "tiny": presets.SD3_TINY,
           **{name: dict(family="flux", **cfg) for name, cfg in presets.FLUX_TRANSFORMERS.items()}}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def make_config(preset: dict) -> MMDiTConfig | FluxConfig:
    fields = dict(preset)
    return FluxConfig(**fields) if fields.pop("family", "sd3") == "flux" else MMDiTConfig(**fields)


def forward_flops(cfg, batch: int, n_img: int, n_txt: int) -> float:
    """Matmul FLOPs of one forward pass (2 per multiply-add), MMDiT or FLUX."""
    return (flux_forward_flops if isinstance(cfg, FluxConfig) else mmdit_forward_flops)(cfg, batch, n_img, n_txt)


def flux_forward_flops(cfg: FluxConfig, batch: int, n_img: int, n_txt: int) -> float:
    """Double-stream blocks: q, k, v, out and the 4x MLP of both streams, joint attention; single-stream blocks:
    q, k, v, the 4x MLP in, the (attention + MLP) -> d output projection, attention; AdaLN modulation once per
    sample; the embedders and the final projection."""
    d, n, m = cfg.inner_dim, n_img, n_txt
    s = n + m
    double = 2 * s * d * d * 4 + 2 * 2 * s * s * d + 2 * s * d * 4 * d * 2 + 2 * d * 6 * d * 2
    single = 2 * s * d * d * 3 + 2 * s * d * 4 * d + 2 * s * 5 * d * d + 2 * 2 * s * s * d + 2 * d * 3 * d
    embed = 2 * n * cfg.in_channels * d + 2 * m * cfg.joint_attention_dim * d + 2 * n * d * cfg.out_channels
    embed += (2 + cfg.guidance_embeds) * (2 * 256 * d + 2 * d * d) + 2 * d * 2 * d
    return batch * (cfg.num_layers * double + cfg.num_single_layers * single + embed)


def mmdit_forward_flops(cfg: MMDiTConfig, batch: int, n_img: int, n_txt: int) -> float:
    d, total = cfg.inner_dim, 0.0
    for dual, pre_only in cfg.block_kinds():
        n, m, s = n_img, n_txt, n_img + n_txt
        f = 2 * n * d * d * 4 + 2 * m * d * d * (3 + (not pre_only))  # q,k,v,out for both streams
        f += 2 * 2 * s * s * d  # scores and weighted sum
        f += 2 * n * d * 4 * d * 2 + (0 if pre_only else 2 * m * d * 4 * d * 2)  # MLPs
        if dual:
            f += 2 * n * d * d * 4 + 2 * 2 * n * n * d
        f += 2 * d * d * ((9 if dual else 6) + (2 if pre_only else 6))  # AdaLN modulation, once per sample
        total += f
    p = cfg.patch_size
    total += 2 * n_img * (p * p * cfg.in_channels) * d + 2 * n_img * d * p * p * cfg.out_channels
    total += 2 * n_txt * cfg.joint_attention_dim * d
    return batch * total


def time_fn(fn, args, iters: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_inputs(cfg, batch, resolution, text_len, seed=0):
    """(latents NHWC, timesteps, text, pooled[, guidance for FLUX.1-dev])."""
    latent = resolution // 8  # the SD3 and FLUX VAEs downsample by 8
    flux = isinstance(cfg, FluxConfig)
    g = np.random.default_rng(seed)
    x = g.standard_normal((batch, latent, latent, cfg.latent_channels if flux else cfg.in_channels), np.float32)
    t = g.uniform(0, 1000, batch).astype(np.float32)
    ctx = g.standard_normal((batch, text_len, cfg.joint_attention_dim), np.float32)
    pooled = g.standard_normal((batch, cfg.pooled_projection_dim), np.float32)
    if flux and cfg.guidance_embeds:
        return x, t, ctx, pooled, np.full((batch,), 3.5, np.float32)
    return x, t, ctx, pooled


def image_tokens(cfg, resolution) -> int:
    patch = 2 if isinstance(cfg, FluxConfig) else cfg.patch_size  # FLUX packs 2x2 latent pixels per token
    return (resolution // 8 // patch) ** 2


def bench_flowjax(cfg, args, inputs):
    model = family_of_config(cfg).model(cfg, rngs=nnx.Rngs(0), dtype=DTYPES[args.dtype],
                                        param_dtype=DTYPES[args.param_dtype], attention_impl=args.attention,
                                        remat=args.remat)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    inputs = [jnp.asarray(a) for a in inputs]

    @jax.jit
    def forward(params, *a):
        return nnx.merge(graphdef, params, rest)(*a)

    @jax.jit
    def forward_backward(params, *a):
        def loss(p):
            return jnp.mean(jnp.square(nnx.merge(graphdef, p, rest)(*a).astype(jnp.float32)))

        return jax.value_and_grad(loss)(params)

    return time_fn(forward, (params, *inputs), args.iters), time_fn(forward_backward, (params, *inputs), args.iters)


def torch_forward(cfg, inputs, device, tdtype):
    """A closure running diffusers' model on the inputs (FLUX: packed latents, ids and t / 1000 as its pipeline)."""
    import diffusers
    import torch

    model = getattr(diffusers, family_of_config(cfg).class_name)(**dataclass_dict(cfg)).to(device, tdtype)
    x, t, ctx, pooled, *guidance = inputs
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(device, tdtype)
    tt, tc, tp = (torch.from_numpy(a).to(device, tdtype) for a in (t, ctx, pooled))
    if not isinstance(cfg, FluxConfig):
        return lambda: model(tx, tc, tp, tt).sample
    b, c, h, w = tx.shape
    packed = diffusers.FluxPipeline._pack_latents(tx, b, c, h, w)
    img_ids = diffusers.FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, tdtype)
    txt_ids = torch.zeros(tc.shape[1], 3, device=device, dtype=tdtype)
    tg = torch.from_numpy(guidance[0]).to(device, torch.float32) if guidance else None
    return lambda: model(hidden_states=packed, encoder_hidden_states=tc, pooled_projections=tp, timestep=tt / 1000,
                         img_ids=img_ids, txt_ids=txt_ids, guidance=tg).sample


def bench_torch(cfg, args, inputs):
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    forward = torch_forward(cfg, inputs, device, tdtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run(backward):
        def fn():
            with torch.set_grad_enabled(backward):
                out = forward()
                if backward:
                    out.float().square().mean().backward()
            sync()
            return 0
        return fn

    out = []
    for backward in (False, True):
        fn = run(backward)
        fn()
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out.append(statistics.median(times))
    return out


def dataclass_dict(cfg):
    d = cfg.to_diffusers()
    d.pop("_class_name")
    return d


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help=f"one of {sorted(PRESETS)} or a diffusers config.json")
    parser.add_argument("--resolution", type=int, default=None, help="image pixels a side (default 512; 256 for tiny)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--text-len", type=int, default=None,
                        help="text tokens (SD3: 77 CLIP + 256 T5 = 333; FLUX: 512 T5)")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="compute dtype")
    parser.add_argument("--param-dtype", choices=DTYPES, default="float32")
    parser.add_argument("--attention", choices=["xla", "cudnn", "auto"], default="xla")
    parser.add_argument("--remat", choices=["none", "full", "dots", "everything"], default="none")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--compare-torch", action="store_true", help="also time diffusers (needs torch)")
    args = parser.parse_args()

    if args.config in PRESETS:
        cfg = make_config(PRESETS[args.config])
    else:
        with open(args.config) as f:
            raw = json.load(f)
        cfg = FAMILIES[raw.get("_class_name", "SD3Transformer2DModel")].config.from_diffusers(raw)
    tiny = args.config.endswith("tiny")
    flux = isinstance(cfg, FluxConfig)
    resolution = args.resolution or (256 if tiny else 1024 if flux else 512)
    text_len = args.text_len or (32 if tiny else 512 if flux else 333)
    inputs = make_inputs(cfg, args.batch, resolution, text_len)
    n_img = image_tokens(cfg, resolution)
    tokens = args.batch * (n_img + text_len)
    flops = forward_flops(cfg, args.batch, n_img, text_len)

    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} | config {args.config} | "
          f"{resolution}px batch {args.batch} | {n_img}+{text_len} tokens/sample | dtype {args.dtype} | "
          f"attention {args.attention} | remat {args.remat}")
    print(f"forward FLOPs/step: {flops / 1e12:.3f} TFLOP")
    fwd, fwdbwd = bench_flowjax(cfg, args, inputs)
    rows = [("flowjax", fwd, fwdbwd)]
    if args.compare_torch:
        rows.append(("diffusers", *bench_torch(cfg, args, inputs)))
    for name, f, fb in rows:
        print(f"{name:10s} forward  {f * 1e3:9.2f} ms  {tokens / f:12.0f} tokens/s  {flops / f / 1e12:8.3f} TFLOP/s")
        print(f"{name:10s} fwd+bwd  {fb * 1e3:9.2f} ms  {tokens / fb:12.0f} tokens/s  {3 * flops / fb / 1e12:8.3f} TFLOP/s")
    if args.compare_torch:
        print(f"speed-up over diffusers: forward x{rows[1][1] / fwd:.2f}, fwd+bwd x{rows[1][2] / fwdbwd:.2f}")


if __name__ == "__main__":
    main()
