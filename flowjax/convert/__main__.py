"""python -m flowjax.convert: move SD3 / SD3.5 and FLUX.1 transformer weights between diffusers and flowjax.

  import-transformer SRC DST     diffusers transformer folder -> flowjax model folder (orbax)
  export-transformer SRC DST     flowjax model folder or training run -> diffusers folder (from_pretrained
                                 loads it); LoRA adapters, if the model has any, are merged into the weights
  export-lora SRC DST            flowjax model folder or training run with LoRA adapters -> diffusers LoRA
                                 folder (pytorch_lora_weights.safetensors, for pipe.load_lora_weights(DST))
                                 A training run (the --workdir of python -m flowjax.train) exports its latest
                                 checkpoint's policy, or with --ema the method's EMA evaluation copy
                                 (--step N for an older checkpoint).
  import-lora BASE LORA DST      base model (flowjax model folder or diffusers transformer folder)
                                 + diffusers / PEFT LoRA -> flowjax model folder with the adapters
  inspect SRC                    check a diffusers transformer folder against its config, print a summary

Reading needs no torch: safetensors files (single or sharded with their index; fp32, fp16 or bf16)
are read with NumPy, mapped through flowjax's key table and checked key by key; any missing,
unexpected or misshaped key stops the conversion with the full list. LoRA files keep PEFT's
scale alpha / rank in their adapter metadata, which diffusers' load_lora_weights applies.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _parse_size(text: str | None) -> int | None:
    if text is None:
        return None
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def _summary(model) -> str:
    from flax import nnx

    from flowjax.models.flux import Flux

    params = nnx.state(model, nnx.Param)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    cfg = model.config
    if isinstance(model, Flux):
        return (
            f"FLUX transformer: {cfg.num_layers} double-stream + {cfg.num_single_layers} single-stream blocks, "
            f"width {cfg.inner_dim}, {cfg.num_attention_heads} heads, guidance_embeds={cfg.guidance_embeds}, "
            f"{count / 1e6:.1f}M parameters"
        )
    return (
        f"SD3 transformer: {cfg.num_layers} blocks ({len(cfg.dual_attention_layers)} dual-attention), "
        f"width {cfg.inner_dim}, {cfg.num_attention_heads} heads, qk_norm={cfg.qk_norm}, "
        f"{count / 1e6:.1f}M parameters, stacks {[(n, 'dual' if d else 'pre_only' if p else 'joint') for _, n, d, p in cfg.stack_layout()]}"
    )


def _lora_summary(model) -> str:
    from flowjax.convert.lora import adapter_spec

    spec = adapter_spec(model)
    kinds = sorted({(s["rank"], round(s["scale"] * s["rank"], 6)) for s in spec.values()})
    return f"LoRA: {len(spec)} adapted projections, (rank, alpha) {kinds}"


def _trained_or_saved(args):
    """The model to export: a training run's trained (or EMA) weights, or a flowjax model folder."""
    from flowjax import checkpoint
    from flowjax.convert import CheckpointError

    if checkpoint.is_run(args.src):
        return checkpoint.load_trained(args.src, ema=args.ema, step=args.step)
    if args.ema or args.step is not None:
        raise CheckpointError(f"--ema and --step need a training run (the --workdir of python -m flowjax.train); "
                              f"{args.src} is not one")
    return checkpoint.load_model(args.src)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flowjax.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-transformer", help="diffusers transformer folder -> flowjax model folder")
    imp.add_argument("src", help="diffusers folder with config.json + diffusion_pytorch_model*.safetensors")
    imp.add_argument("dst", help="new flowjax model folder")
    imp.add_argument("--param-dtype", choices=DTYPES, default="float32", help="dtype the weights are stored in")
    exp = sub.add_parser("export-transformer", help="flowjax model folder -> diffusers transformer folder (LoRA merged)",
                         description="Writes config.json + safetensors for SD3Transformer2DModel / "
                         "FluxTransformer2DModel.from_pretrained. "
                         "LoRA adapters, if the model has any, are merged into the written weights (the "
                         "merge is exact in fp32); use export-lora to write the adapter on its own.")
    exp.add_argument("src", help="flowjax model folder (from import-transformer) or training run (--workdir)")
    exp.add_argument("dst", help="output folder for SD3Transformer2DModel / FluxTransformer2DModel.from_pretrained")
    exp.add_argument("--dtype", choices=DTYPES, default=None, help="write weights in this dtype (default: as stored)")
    exp.add_argument("--max-shard-size", default=None, help="split into shards of at most this size, e.g. 5GB")
    elo = sub.add_parser("export-lora", help="flowjax model folder with LoRA -> diffusers LoRA folder",
                         description="Writes DST/pytorch_lora_weights.safetensors with the model's LoRA adapters, "
                         "keys transformer.<module>.lora_A/lora_B.weight, rank and alpha in the adapter metadata: "
                         "StableDiffusion3Pipeline / FluxPipeline.load_lora_weights(DST) applies it.")
    elo.add_argument("src", help="flowjax model folder whose model carries LoRA adapters (e.g. from import-lora) "
                     "or a training run (the --workdir of python -m flowjax.train)")
    elo.add_argument("dst", help="output folder (or a .safetensors file name)")
    elo.add_argument("--dtype", choices=DTYPES, default=None, help="write weights in this dtype (default: as stored)")
    elo.add_argument("--fold-scale", action="store_true",
                     help="multiply lora_B by alpha/rank and write alpha=rank, for readers that ignore the metadata")
    ilo = sub.add_parser("import-lora", help="base model + diffusers/PEFT LoRA -> flowjax model folder with adapters",
                         description="Attaches the LoRA's adapters (its ranks, alpha from its metadata, else "
                         "alpha=rank) to the base transformer and writes a flowjax model folder, e.g. to keep "
                         "training a published LoRA. Text-encoder LoRA weights are refused.")
    ilo.add_argument("base", help="flowjax model folder, or a diffusers SD3 / FLUX transformer folder (config.json)")
    ilo.add_argument("lora", help="LoRA .safetensors file, or a folder with pytorch_lora_weights.safetensors "
                     "or adapter_model.safetensors (+ adapter_config.json)")
    ilo.add_argument("dst", help="new flowjax model folder")
    ilo.add_argument("--adapter-name", default=None, help="which adapter, if the file holds several")
    ilo.add_argument("--param-dtype", choices=DTYPES, default="float32",
                     help="dtype of the base weights when BASE is a diffusers folder")
    ilo.add_argument("--lora-dtype", choices=DTYPES, default="float32", help="dtype the adapters are stored in")
    for p_ in (exp, elo):
        p_.add_argument("--ema", action="store_true",
                        help="training runs: export the method's EMA evaluation copy instead of the policy")
        p_.add_argument("--step", type=int, default=None, help="training runs: this checkpoint (default: the latest)")
    ins = sub.add_parser("inspect", help="validate a diffusers transformer folder and print its summary")
    ins.add_argument("src")
    args = parser.parse_args(argv)

    from flowjax import checkpoint
    from flowjax.convert import CheckpointError, load_lora, load_transformer, save_lora, save_transformer

    try:
        if args.command == "import-transformer":
            model = load_transformer(args.src, param_dtype=DTYPES[args.param_dtype], progress=True)
            out = checkpoint.save_model(model, args.dst)
            print(f"{_summary(model)}\nwrote {out}")
        elif args.command == "export-transformer":
            model = _trained_or_saved(args)
            dtype = DTYPES[args.dtype] if args.dtype else None
            out = save_transformer(model, args.dst, dtype=dtype, max_shard_bytes=_parse_size(args.max_shard_size))
            print(f"{_summary(model)}\nwrote {out}")
        elif args.command == "export-lora":
            model = _trained_or_saved(args)
            dtype = DTYPES[args.dtype] if args.dtype else None
            out = save_lora(model, args.dst, dtype=dtype, fold_scale=args.fold_scale)
            print(f"{_lora_summary(model)}\nwrote {out}")
        elif args.command == "import-lora":
            if (Path(args.base) / checkpoint.MANIFEST).is_file():
                model = checkpoint.load_model(args.base)
            else:
                model = load_transformer(args.base, param_dtype=DTYPES[args.param_dtype], progress=True)
            load_lora(model, args.lora, adapter_name=args.adapter_name, param_dtype=DTYPES[args.lora_dtype])
            out = checkpoint.save_model(model, args.dst)
            print(f"{_summary(model)}\n{_lora_summary(model)}\nwrote {out}")
        else:
            print(_summary(load_transformer(args.src, param_dtype=jnp.float32, progress=True)))
    except (CheckpointError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
