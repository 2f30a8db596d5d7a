"""python -m flowjax.plan --config=CONFIG --topology=T [--config.key=value ...]

Tells before launch whether a training config fits a TPU slice: it builds the trainer's own programs (rollout,
reward, update, evaluation: `Trainer(abstract=True)`, shapes only, no weights) and compiles each ahead of time
for the TPU topology T on this machine, with the TPU compiler from PyPI (`pip install -e ".[plan]"`, which
installs the `libtpu` that jax pins; no TPU is needed). Shapes come from the model folder of the config when it
exists (`world.model`), else from flowjax.models.presets (`--preset`; SD3.5-Medium for SD3 configs,
FLUX.1-dev for FLUX ones: configs/flux_pickscore.py, configs/flux_geneval.py).

Prints, per program: the calls per epoch, rows per call, the per-chip argument / temporary / output bytes, the
peak per chip (resident weights and states + the epoch's buffers + the call's inputs, temporaries and outputs)
and its FLOPs; the resident bytes by part; the epoch's FLOPs and their roofline time at the chip's bf16 peak;
the micro-batches that fit (`sample.micro_batch`, `train.micro_batch`, searched when the config's do not fit);
and as its last line
  plan: <config> on <topology> (<n> chips): peak <X> GiB per chip of <Y> GiB: fits | does not fit
Topologies by their Cloud names (v5e-8, v5p-16, v4-32, v6e-8, ...) or as jax names them (v5e:2x4).
Compiled results are cached by program text in ~/.cache/flowjax/plan (FLOWJAX_PLAN_CACHE), so configs that
share programs compile them once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import threading
import time
from pathlib import Path

GiB = 1024**3


# ------------------------------------------------------------------------------------------ topologies


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm: float  # bytes per chip
    bf16_flops: float  # peak bf16 FLOP/s per chip
    cores_per_chip: int  # TensorCores behind one Cloud "-N" count (v4 / v5p count cores, v5e / v6e chips)


# Public Cloud TPU specifications (cloud.google.com/tpu/docs: v4, v5e, v5p, v6e system architecture pages).
CHIPS = {"v4": Chip(32 * GiB, 275e12, 2), "v5e": Chip(16 * GiB, 197e12, 1), "v5p": Chip(95 * GiB, 459e12, 2),
         "v6e": Chip(32 * GiB, 918e12, 1)}
# Chip grids of the slice sizes (2-D for v5e / v6e, 3-D for v4 / v5p).
_GRIDS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_GRIDS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8"}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given
    jax_name: str  # for jax.experimental.topologies.get_topology_desc
    chip: Chip
    chips: int


def parse_topology(name: str) -> Topology:
    """'v5e-8' (Cloud: chips for v5e / v6e, TensorCores for v4 / v5p) or 'v5e:2x4' (jax's form)."""
    m = re.fullmatch(r"(v4|v5e|v5p|v6e)([-:])(\S+)", name.strip().lower().replace("v5litepod", "v5e"))
    if not m:
        raise ValueError(f"unknown TPU topology {name!r}: give a Cloud name such as v5e-8, v5p-16, v4-32, v6e-8, "
                         f"or jax's form such as v5e:2x4 (generations: {', '.join(CHIPS)})")
    gen, sep, rest = m.groups()
    chip = CHIPS[gen]
    if sep == ":":
        dims = [int(d) for d in rest.split("x")]
        return Topology(name, f"{gen}:{rest}", chip, math.prod(dims))
    if not rest.isdigit():
        raise ValueError(f"{name!r}: the size after '-' must be a number (v5e-8)")
    chips = int(rest) // chip.cores_per_chip
    grids = _GRIDS_3D if gen in ("v4", "v5p") else _GRIDS_2D
    if chips not in grids:
        raise ValueError(f"{name!r}: no {gen} slice of {chips} chips; known sizes: "
                         f"{', '.join(f'{gen}-{n * chip.cores_per_chip}' for n in grids)}")
    return Topology(name, f"{gen}:{grids[chips]}", chip, chips)


def tpu_devices(topology: Topology):
    """Abstract devices of the topology (libtpu compiles for them; nothing runs)."""
    # The compiler is loaded into more than one process at a time (tests, parallel plans); no TPU is opened.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise SystemExit("flowjax.plan compiles with the TPU compiler of the `libtpu` package, which is not "
                         "installed; install it with `pip install -e \".[plan]\"` (no TPU is needed)") from None
    from jax.experimental import topologies

    return topologies.get_topology_desc(platform="tpu", topology_name=topology.jax_name).devices


# ------------------------------------------------------------------------------------------ the world


class PlanWorld:
    """The SD3 / FLUX world's shapes without its weights: conditioning shapes, and a score that decodes with the
    VAE and applies the reward model (jittable rewards), or only decodes (host rewards take no accelerator memory
    beyond the decoded images). Text encoders are not in the training programs; their weights are counted as
    resident when the prompt set is encoded per batch. As the SD3 world with a FLUX pipeline, it gives the
    trainer FLUX.1-dev's embedded guidance (`model_guidance`, None for SD3 and FLUX.1-schnell) and the
    pipeline's schedule (`sigmas(num_steps)`, for `sample.shift = "dynamic"`; None for SD3)."""

    def __init__(self, config, *, channels, cond_shapes, vae_cfg, reward, dtype, num_prompts: int,
                 model_guidance: float | None = None, sigmas=None):
        import jax.numpy as jnp
        from flax import nnx

        from flowjax.models.vae import AutoencoderKL

        self.config = config
        self.channels = channels
        self.num_prompts = num_prompts
        self.cond_shapes = cond_shapes
        self.model_guidance = model_guidance
        self._sigmas = sigmas
        vae = nnx.eval_shape(lambda: AutoencoderKL(vae_cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))
        self._vae_graphdef, vae_state = nnx.split(vae)
        self.reward = reward
        self.state = {"vae": vae_state, "reward": None if reward is None else reward.params,
                      "tokens": None if reward is None else jnp.zeros(
                          (num_prompts, getattr(reward, "token_width", 77)), jnp.int32)}

    def sigmas(self, num_steps: int):
        if self._sigmas is None:
            raise ValueError("sample.shift='dynamic' needs a FLUX world; SD3 configs give a number (3.0)")
        return self._sigmas(num_steps)

    def encode(self, ids):
        raise NotImplementedError("PlanWorld has shapes only")

    def negative(self, batch):
        raise NotImplementedError("PlanWorld has shapes only")

    def score(self, samples, prompt_ids, state=None):
        import jax.numpy as jnp
        from flax import nnx

        state = self.state if state is None else state
        images = nnx.merge(self._vae_graphdef, state["vae"]).latents_to_images(samples).astype(jnp.float32)
        if self.reward is None:
            return {"reward": images.mean(axis=(1, 2, 3))}  # a host reward would score these images
        return {"reward": self.reward.score(state["reward"], images, state["tokens"][prompt_ids])}


def _param_bytes(build, dtype) -> int:
    """Parameter bytes of a module, in `dtype`, from its abstract shapes."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    state = nnx.state(nnx.eval_shape(build), nnx.Param)
    return sum(math.prod(x.shape) * jnp.dtype(dtype).itemsize for x in jax.tree.leaves(state))


def _folder_config(config, sub: str, default: dict) -> dict:
    """The config.json of `world.model`/<sub> when that folder exists, else `default` (a preset)."""
    from flowjax.convert.safetensors_io import read_config_json

    folder = _model_folder(config)
    return read_config_json(folder / sub) if folder and (folder / sub / "config.json").is_file() else default


def _model_folder(config) -> Path | None:
    model = config.world.get("model") or ""
    return Path(model) if model and Path(model).is_dir() else None


def _jittable_reward(config):
    """The config's reward when it runs inside the programs (PickScore, OCR), as shapes; None for host rewards."""
    from flax import nnx

    from flowjax.models import presets
    from flowjax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

    name = str(config.reward.get("name", "")).lower()
    if name == "ocr":
        return _ocr_reward(config)
    if name != "pickscore":
        return None
    from flowjax.rewards.clip_rewards import CLIPDual, PickScore
    from flowjax.rewards.preprocess import CLIPPreprocess

    dual = nnx.eval_shape(lambda: CLIPDual(
        CLIPTextModel(CLIPTextConfig.from_transformers(presets.PICKSCORE_TEXT), with_projection=True,
                      rngs=nnx.Rngs(0)),
        CLIPVisionModel(CLIPVisionConfig.from_transformers(presets.PICKSCORE_VISION), with_projection=True,
                        rngs=nnx.Rngs(0)), 4.6))
    return PickScore(dual, CLIPPreprocess(image_size=224))


class _AbstractWeights:
    """A jittable reward whose weights are shapes only (the plan compiles its programs, never runs them)."""

    def __init__(self, reward, token_width: int):
        import jax

        self.score = reward.score
        self.params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), reward.params)
        self.token_width = token_width


def _ocr_reward(config):
    """Flow-GRPO's OCR reward as the trainer runs it (PP-OCRv4 detection and recognition in the reward program,
    the box post-processing as a host callback); the installed rapidocr-onnxruntime's ONNX files (or
    reward.path) give the networks' shapes."""
    from flowjax.rewards.ocr import OCRReward

    try:
        reward = OCRReward(config.reward.get("path") or None, **dict(config.reward.get("options") or {}))
    except (FileNotFoundError, ImportError) as e:
        raise ValueError(f"the OCR reward's networks are part of the reward program, and their files are needed to "
                         f"plan it ({e}); pip install -e '.[ocr]' && pip install --no-deps rapidocr-onnxruntime, or "
                         "--config.reward.path=DIR with the two ONNX files") from e
    return _AbstractWeights(reward, token_width=1 + reward.max_target_chars)


def _sd3_parts(config, preset: str, dtype):
    """(transformer config, VAE config, jittable reward or None, text-encoder parameter bytes) of an SD3 config."""
    from flax import nnx

    from flowjax.models import presets
    from flowjax.models.clip import CLIPTextConfig, CLIPTextModel
    from flowjax.models.mmdit import MMDiTConfig
    from flowjax.models.t5 import T5Config, T5Encoder
    from flowjax.models.vae import VAEConfig

    if preset not in presets.TRANSFORMERS:
        raise ValueError(f"--preset must be one of {sorted(presets.TRANSFORMERS)} for an SD3 config, got {preset!r}")
    transformer = MMDiTConfig.from_diffusers(_folder_config(config, "transformer", presets.TRANSFORMERS[preset]))
    vae = VAEConfig.from_diffusers(_folder_config(config, "vae", presets.PRESET_VAES.get(preset, presets.SD3_VAE)))

    encoders = _param_bytes(lambda: CLIPTextModel(CLIPTextConfig.from_transformers(presets.CLIP_L_TEXT),
                                                  with_projection=True, rngs=nnx.Rngs(0)), dtype)
    encoders += _param_bytes(lambda: CLIPTextModel(CLIPTextConfig.from_transformers(presets.CLIP_G_TEXT),
                                                   with_projection=True, rngs=nnx.Rngs(0)), dtype)
    if config.world.get("text_encoder_3", True):
        encoders += _param_bytes(lambda: T5Encoder(T5Config.from_transformers(presets.T5_XXL), rngs=nnx.Rngs(0)),
                                 dtype)
    return transformer, vae, _jittable_reward(config), encoders


def _flux_parts(config, preset: str, dtype):
    """(transformer config, VAE config, jittable reward or None, text-encoder parameter bytes, schedule settings)
    of a FLUX config: FluxPipeline's parts (CLIP-L pooled + T5-XXL), from `world.model` when it exists, else
    from the presets (FLUX.1-dev, its VAE, FluxPipeline's default schedule: FLUX.1-dev's dynamic shift)."""
    from flax import nnx

    from flowjax.models import presets
    from flowjax.models.clip import CLIPTextConfig, CLIPTextModel
    from flowjax.models.flux import FluxConfig
    from flowjax.models.t5 import T5Config, T5Encoder
    from flowjax.models.vae import VAEConfig
    from flowjax.pipeline.flux import _SCHEDULE_DEFAULTS, read_scheduler_config

    if preset not in presets.FLUX_TRANSFORMERS:
        raise ValueError(f"--preset must be one of {sorted(presets.FLUX_TRANSFORMERS)} for a FLUX config, "
                         f"got {preset!r}")
    transformer = FluxConfig.from_diffusers(_folder_config(config, "transformer", presets.FLUX_TRANSFORMERS[preset]))
    vae = VAEConfig.from_diffusers(_folder_config(config, "vae", presets.PRESET_VAES.get(preset, presets.FLUX_VAE)))
    folder = _model_folder(config)
    schedule = {**_SCHEDULE_DEFAULTS, "use_dynamic_shifting": True, "time_shift_type": "exponential"}
    if folder and (folder / "scheduler").is_dir():
        schedule.update(read_scheduler_config(folder / "scheduler"))
    # FluxPipeline's text encoders: CLIP-L (its pooled output, no projection) and T5-XXL.
    encoders = _param_bytes(lambda: CLIPTextModel(CLIPTextConfig.from_transformers(presets.CLIP_L_TEXT),
                                                  with_projection=False, rngs=nnx.Rngs(0)), dtype)
    encoders += _param_bytes(lambda: T5Encoder(T5Config.from_transformers(presets.T5_XXL), rngs=nnx.Rngs(0)), dtype)
    return transformer, vae, _jittable_reward(config), encoders, schedule


def _flux_sigmas(schedule: dict, latent_size):
    """FluxPipeline.sigmas at the config's latent size: num_steps -> sigmas [num_steps + 1]."""
    from flowjax import sampling
    from flowjax.models.flux import PACK

    h, w = latent_size
    mu = (sampling.flux_mu((h // PACK) * (w // PACK), schedule["base_image_seq_len"], schedule["max_image_seq_len"],
                           schedule["base_shift"], schedule["max_shift"])
          if schedule["use_dynamic_shifting"] else None)
    return lambda n: sampling.flux_sigmas(n, mu=mu, shift=schedule["shift"],
                                          time_shift_type=schedule["time_shift_type"])


DEFAULT_PRESETS = {"sd3": "sd35-medium", "flux": "flux-dev"}


def build_abstract(config, mesh, *, preset: str | None = None):
    """The config's trainer in abstract mode on `mesh`, and the resident bytes that live outside its programs'
    arguments ({name: bytes per device}). `preset`: the transformer's shapes when `world.model` is absent
    (default: sd35-medium for SD3 configs, flux-dev for FLUX)."""
    import jax.numpy as jnp
    from flax import nnx

    from flowjax import sharding as sharding_lib
    from flowjax.models.mmdit import MMDiT, MMDiTConfig
    from flowjax.rl.trainer import Trainer

    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    dtype = dtypes[config.get("dtype", "float32")]
    param_dtype = dtypes[config.get("param_dtype", "float32")]
    rules = tuple(config.sharding_rules)
    act = sharding_lib.ActivationSharding(mesh, rules)
    name = config.world.get("name", "toy")
    preset = preset or DEFAULT_PRESETS.get(name)
    extra, model_opts = {}, dict(config.get("model") or {})
    kw = dict(attention_impl=model_opts.get("attention", "xla"), remat=model_opts.get("remat", "none"))
    if name in ("sd3", "flux"):
        n_prompts = max(int(config.world.get("generate_train", 5000)), config.train.prompts_per_batch)
        seq = int(config.world.get("max_sequence_length", 128))  # T5 tokens
        if name == "sd3":
            transformer, vae, reward, encoders = _sd3_parts(config, preset, param_dtype)
            world = PlanWorld(config, channels=transformer.in_channels,
                              cond_shapes=((77 + seq, transformer.joint_attention_dim),  # CLIP + T5, as SD3Pipeline
                                           (transformer.pooled_projection_dim,)),
                              vae_cfg=vae, reward=reward, dtype=dtype, num_prompts=n_prompts)
            build = lambda: MMDiT(transformer, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                  activation_sharding=act, **kw)
        else:
            from flowjax.models.flux import Flux

            transformer, vae, reward, encoders, schedule = _flux_parts(config, preset, param_dtype)
            if vae.latent_channels != transformer.latent_channels:
                raise ValueError(f"the FLUX transformer takes {transformer.latent_channels} latent channels, the VAE "
                                 f"gives {vae.latent_channels}")
            guidance = float(config.world.get("guidance", 3.5)) if transformer.guidance_embeds else None
            world = PlanWorld(config, channels=transformer.latent_channels,
                              cond_shapes=((seq, transformer.joint_attention_dim),  # T5 only, as FluxPipeline
                                           (transformer.pooled_projection_dim,)),
                              vae_cfg=vae, reward=reward, dtype=dtype, num_prompts=n_prompts,
                              model_guidance=guidance, sigmas=_flux_sigmas(schedule, config.sample.latent_size))
            build = lambda: Flux(transformer, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                 activation_sharding=act, **kw)
        if n_prompts > int(config.world.get("precompute_limit", 256)):
            extra["text encoders (sharded, encode per batch)"] = encoders / mesh.size
    elif name == "toy":
        from flowjax.worlds.toy import ToyWorld

        arch = MMDiTConfig(**config.arch)
        world = ToyWorld(text_len=config.world.text_len, joint_dim=arch.joint_attention_dim,
                         pooled_dim=arch.pooled_projection_dim, channels=arch.in_channels,
                         num_prompts=config.world.num_prompts, target_scale=config.world.target_scale, seed=config.seed)
        build = lambda: MMDiT(arch, rngs=nnx.Rngs(0), dtype=dtype, activation_sharding=act, **kw)
    else:
        raise ValueError(f"flowjax.plan supports the sd3, flux and toy worlds, not world.name={name!r}")
    trainer = Trainer(config, None, model=build, world=world, mesh=mesh, abstract=True)
    return trainer, extra


# ------------------------------------------------------------------------------------------ measuring


def per_device_bytes(tree) -> int:
    """Bytes one device holds of an abstract pytree (each leaf by its sharding's shard shape)."""
    import jax
    import numpy as np

    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def _cache_dir() -> Path:
    return Path(os.environ.get("FLOWJAX_PLAN_CACHE", Path.home() / ".cache" / "flowjax" / "plan"))


# The two forms libtpu words a compile-time HBM refusal in: the first names what it sized, the second (the
# "CompileTimeHbmOom" report) breaks the program down and names its HLO temporaries.
_OOM_FORMS = (re.compile(r"total memory required for (.+?) \(([\d.]+)([KMGT])\) exceeds available HBM"),
              re.compile(r"(HLO temp)\s+([\d.]+)([KMGT])"))


def oom_request(message: str) -> tuple[str, float] | None:
    """(what, bytes) the TPU compiler asked for when it refused a program for lack of HBM, else None."""
    if "RESOURCE_EXHAUSTED" not in message:
        return None
    for form in _OOM_FORMS:
        m = form.search(message)
        if m:
            return m.group(1), float(m.group(2)) * {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(3)]
    return None


def measure(lowered, topology: Topology, log=None) -> dict:
    """Per-device bytes (arguments, temporaries, outputs, aliased) of a compiled program, cached by the program's
    text and the topology; `cached` says whether it came from the cache. A program the TPU compiler refuses for
    lack of HBM is returned with `oom=True` and the temporaries the compiler asked for. `log` hears of a compile
    before it starts (they take minutes for a large model)."""
    import jax

    text = lowered.as_text()
    key = hashlib.sha256((topology.jax_name + "\n" + text).encode()).hexdigest()[:32]
    path = _cache_dir() / f"{key}.json"
    if path.is_file():
        return {**json.loads(path.read_text()), "cached": True}
    if log is not None:
        log(f"plan: compiling for {topology.name} (minutes for a large model; the result is cached in {path.parent})")
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        refused = oom_request(str(e))
        if refused is None:
            raise
        what, need = refused
        out = dict(arguments=0, temporaries=int(need), outputs=0, aliased=0, code=0, oom=True, oom_what=what)
    else:
        mem = compiled.memory_analysis()
        out = dict(arguments=int(mem.argument_size_in_bytes), temporaries=int(mem.temp_size_in_bytes),
                   outputs=int(mem.output_size_in_bytes), aliased=int(mem.alias_size_in_bytes),
                   code=int(mem.generated_code_size_in_bytes), oom=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    return {**out, "cached": False}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


SAMPLE_PROGRAMS, TRAIN_PROGRAMS = ("rollout", "reward", "evaluate"), ("update",)


def plan(config, topology: Topology, *, name: str | None = None, preset: str | None = None, devices=None,
         log=print) -> dict:
    """Compiles the config's programs for `topology`; when they do not fit, searches the largest micro-batches
    that do (a line through the measured memory of two sizes, each guess compiled to check it). Returns the
    report (also printed through `log`)."""
    import jax

    # TPU executables compiled here are measured, never run (measurements have their own cache, by program):
    # they stay out of JAX's persistent compilation cache, which could not load them without a TPU client.
    previous = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        return _plan(config, topology, name=name, preset=preset, devices=devices, log=log)
    finally:
        jax.config.update("jax_enable_compilation_cache", previous)


def _plan(config, topology: Topology, *, name, preset, devices, log) -> dict:
    import jax
    import numpy as np

    from flowjax import flops as flops_lib
    from flowjax import sharding as sharding_lib
    from flowjax.rl import abstract, evaluation
    from flowjax.rl.batching import minibatch_layout

    devices = devices if devices is not None else tpu_devices(topology)
    n_dev = len(devices)
    per_dev = topology.chips / n_dev  # chips per device (v4 topologies expose each core as a device)
    hbm = topology.chip.hbm * per_dev
    mesh = sharding_lib.make_mesh(dict(config.mesh), devices=devices)
    trainer, extra = build_abstract(config, mesh, preset=preset)
    dp, t = trainer._dp(), config.train
    batch = trainer.batch_size
    resident = {"trainable params, optimizer, policies, EMA": per_device_bytes(
        (trainer.state.params, trainer.state.opt_state, trainer.state.method, trainer.state.ema)),
        "frozen model": per_device_bytes(trainer.frozen)}
    if getattr(trainer.world, "state", None) is not None:
        resident["VAE and reward model"] = per_device_bytes(trainer.world.state)
    resident.update(extra)
    resident_total = sum(resident.values())
    cache: dict = {}

    def measured(sample_micro: int, train_micro: int, names) -> dict:
        """{program: measurement with its peak per device} at these micro-batches."""
        config.sample.micro_batch, config.train.micro_batch = sample_micro, train_micro
        tr, _ = build_abstract(config, mesh, preset=preset)
        args = abstract.program_args(tr)
        rows = tr.micro_rows or tr.batch_size
        keep_shapes, _ = jax.eval_shape(tr._rollout, *args["rollout"])
        keep_shapes.pop("source", None)
        keep_bytes = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(keep_shapes))
        ctx_shape, pooled_shape = tr.world.cond_shapes
        cond_row = (math.prod(ctx_shape) + math.prod(pooled_shape)) * np.dtype(tr.compute_dtype).itemsize
        # The epoch's buffers (what the rollouts keep for training, the conditioning) live through the updates.
        epoch = (keep_bytes / rows * tr.method.rows(batch) + cond_row * batch) / dp
        update_rows = tr.minibatch_rows
        calls = {"rollout": batch // rows, "reward": batch // rows, "update": t.minibatches,
                 "evaluate": -(-len(evaluation.eval_prompt_ids(tr)[0]) // rows) / max(1, config.eval_every)}
        out = {}
        for name in names:
            key = (name, sample_micro if name in SAMPLE_PROGRAMS else train_micro)
            if key not in cache:
                micro = key[1] or "the whole batch"
                log(f"plan: {name}, micro-batch {micro} rows per device, on {topology.name}: tracing and lowering")
                started = time.perf_counter()
                traced = abstract.trace(tr, name, args[name])  # one trace: the FLOPs' jaxpr and the compiled text
                m = measure(traced.lower(), topology, log=log)
                # XLA's cost analysis counts a loop body once (the sampler's steps, the scanned blocks): the
                # FLOPs of a call are counted from the program's jaxpr instead, loops multiplied out.
                counted = flops_lib.count_jaxpr(traced.jaxpr.jaxpr)
                m.update(model_flops=counted.flops, uncounted_loops=counted.uncounted_loops)
                took = time.perf_counter() - started
                how = "from the cache" if m.pop("cached") else f"traced and compiled in {took:.0f} s"
                log(f"plan: {name}: {'refused for lack of HBM' if m.get('oom') else 'measured'} ({how})")
                m["inputs"] = max(0, m["arguments"] - _resident_args(args[name], tr))
                live = epoch if name in ("rollout", "update") else 0.0
                m["peak"] = (float("inf") if m.get("oom") else
                             resident_total + live + m["inputs"] + m["temporaries"] + m["outputs"] - m["aliased"])
                m.update(calls=calls[name], rows=update_rows if name == "update" else rows, epoch_buffers=epoch)
                cache[key] = m
            out[name] = cache[key]
        return out

    def search(names, current: int, total_rows: int, other: int, is_sample: bool) -> int:
        """The largest micro-batch (rows per device per call) whose programs fit, from the current one down."""
        at = (lambda m: measured(m, other, names)) if is_sample else (lambda m: measured(other, m, names))
        worst = lambda res: max(r["peak"] for r in res.values())
        need = lambda res: max(r["temporaries"] for r in res.values())  # what grows with the rows
        unit = 1 if is_sample else trainer.method.train_micro_unit()  # GDRO: whole groups per gradient call
        # Sizes that divide the rows: any other cap makes calls of another size (the rows are split evenly) or
        # pads them with rows of weight 0 (wasted compute).
        multiples = list(range(unit, max(total_rows, unit) + 1, unit))
        sizes = _divisors(total_rows) if is_sample else [s for s in multiples if total_rows % s == 0] or multiples
        m0 = current or total_rows
        first = at(m0 if current or unit == 1 else 0)  # 0: the whole minibatch per call (m0 may be no multiple)
        if worst(first) <= hbm:
            return current
        points = [(m0, need(first))]
        budget = hbm - resident_total - max(r.get("epoch_buffers", 0.0) for r in first.values())
        for _ in range(6):  # guess with a line through the measured temporaries, then check by compiling
            if len(points) == 1:
                slope, base = points[0][1] / points[0][0], 0.0
            else:
                (m1, n1), (m2, n2) = points[-2:]
                slope = (n1 - n2) / (m1 - m2) if m1 != m2 else n1 / m1
                base = n1 - slope * m1
            fit = [s for s in sizes if s < points[-1][0] and base + slope * s <= 0.9 * budget]
            guess = max(fit) if fit else min(sizes)
            res = at(guess)
            if worst(res) <= hbm:
                bigger = [s for s in sizes if guess < s < min(p[0] for p in points)]
                for s in sorted(bigger, reverse=True)[:1]:  # one step up, when the line was pessimistic
                    if worst(at(s)) <= hbm:
                        return s
                return guess
            points.append((guess, need(res)))
            if guess == min(sizes):
                return guess
        return points[-1][0]

    sample_micro = int(config.sample.get("micro_batch", 0) or 0)
    train_micro = int(t.get("micro_batch", 0) or 0)
    rows_per_dev = batch // dp
    searched_sample = search(SAMPLE_PROGRAMS, sample_micro, rows_per_dev, train_micro, True)
    update_rows = minibatch_layout(trainer.method.rows(batch), t.minibatches, dp)[1] // dp  # per device, in one call
    searched_train = search(TRAIN_PROGRAMS, train_micro, update_rows, searched_sample, False)
    searched = (searched_sample, searched_train) != (sample_micro, train_micro)
    programs = measured(searched_sample, searched_train, SAMPLE_PROGRAMS + TRAIN_PROGRAMS)
    programs = {k: programs[k] for k in ("rollout", "reward", "update", "evaluate")}
    peak = max(m["peak"] for m in programs.values())
    peak_flops = topology.chip.bf16_flops * per_dev
    epoch_flops = sum(m["model_flops"] * m["calls"] for m in programs.values())
    report = dict(config=name or f"{config.method}:{config.get('variant', config.method)}", topology=topology.name, chips=topology.chips,
                  devices=n_dev, hbm_per_chip=topology.chip.hbm, resident=resident, programs=programs,
                  epoch_buffers=programs["update"]["epoch_buffers"], sample_micro=searched_sample,
                  train_micro=searched_train, peak=peak, epoch_flops=epoch_flops,
                  roofline_s=epoch_flops / (peak_flops * n_dev), searched=searched, fits=peak <= hbm)
    _print(report, per_dev, log)
    return report


def _resident_args(args: tuple, tr) -> int:
    """Bytes per device of a program's arguments that are resident states (params, model, world weights)."""
    resident_like = (tr.state, tr.frozen, tr.ref_params, getattr(tr.world, "state", None), tr.state.params,
                     tr.state.method)
    ids = {id(x) for x in resident_like if x is not None}
    return sum(per_device_bytes(a) for a in args if id(a) in ids)


def _print(r: dict, chips_per_device: float, log) -> None:
    gib = lambda b: f"{b / 2**20:8.0f}"
    log(f"{'program':10s} {'calls/epoch':>11s} {'rows/call':>9s} {'inputs':>8s} {'temps':>8s} {'outputs':>8s} "
        f"{'peak/chip':>9s} {'GFLOP/call':>11s}   (MiB per chip)")
    for name, m in r["programs"].items():
        per_chip = lambda b: b / chips_per_device
        peak = "     OOM" if m.get("oom") else gib(per_chip(m["peak"]))
        log(f"{name:10s} {m['calls']:11.2f} {m['rows']:9d} {gib(per_chip(m['inputs']))} {gib(per_chip(m['temporaries']))} "
            f"{gib(per_chip(m['outputs'] - m['aliased']))} {peak:>9s}  {m['model_flops'] / 1e9:11.1f}")
    for name, b in r["resident"].items():
        log(f"resident: {name}: {b / chips_per_device / 2**20:.0f} MiB per chip")
    log(f"epoch buffers (rollout keeps, conditioning): {r['epoch_buffers'] / chips_per_device / 2**20:.0f} MiB per chip")
    loops = sum(m.get("uncounted_loops", 0) for m in r["programs"].values())
    if loops:
        log(f"FLOPs: {loops} while loop(s) counted once (their trip counts are not static)")
    log(f"FLOPs per epoch (matmuls and convolutions): {r['epoch_flops'] / 1e15:.2f} PFLOP; roofline at "
        f"{r['chips']} chips' bf16 peak: "
        f"{r['roofline_s']:.1f} s per epoch")
    log(f"micro-batches: sample.micro_batch={r['sample_micro']} train.micro_batch={r['train_micro']}"
        + (" (searched: the config's did not fit)" if r["searched"] else ""))
    peak = r["peak"] / chips_per_device
    if not math.isfinite(peak):  # the compiler refused a program even at one row per device
        peak = max(m["temporaries"] + m["arguments"] for m in r["programs"].values()) / chips_per_device
    log(f"plan: {r['config']} on {r['topology']} ({r['chips']} chips): peak {peak / GiB:.1f} GiB per chip of "
        f"{r['hbm_per_chip'] / GiB:.1f} GiB: {'fits' if r['fits'] else 'does not fit'}")


# ------------------------------------------------------------------------------------------ command line


def main(argv=None) -> int:
    import ml_collections  # noqa: F401
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/geneval.py:grpo", lock_config=False)
    flags.DEFINE_string("topology", None, "TPU topology: v5e-8, v5p-16, v4-32, v6e-8, ... or v5e:2x4")
    flags.DEFINE_string("preset", None, "model shapes when the config's world.model folder is absent: "
                        "sd35-medium (SD3 default), sd35-large, sd3-medium, sd3-tiny, flux-dev (FLUX default), "
                        "flux-schnell, flux-tiny")
    flags.mark_flags_as_required(["config", "topology"])

    def run(_):
        f = flags.FLAGS
        config = f.config
        topology = parse_topology(f.topology)
        box = {}

        def work():  # the TPU compiler's convolution emitter needs a deep stack
            try:
                box["report"] = plan(config, topology, name=f["config"].config_filename, preset=f.preset)
            except BaseException as e:  # noqa: BLE001
                box["error"] = e

        threading.stack_size(512 * 1024 * 1024)
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]
        return 0

    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu compiles; it must not try to open a TPU
    app.run(run, argv=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
