"""python -m flowjax.convert: move SD3 / SD3.5 weights between diffusers and flowjax.

  import-transformer SRC DST   diffusers transformer folder -> flowjax model folder (orbax)
  export-transformer SRC DST   flowjax model folder -> diffusers folder (from_pretrained loads it)
  inspect SRC                  check a diffusers transformer folder against its config, print a summary

Reading needs no torch: safetensors files (single or sharded with their index; fp32, fp16 or bf16)
are read with NumPy, mapped through flowjax's key table and checked key by key; any missing,
unexpected or misshaped key stops the conversion with the full list.
"""

from __future__ import annotations

import argparse
import sys

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

    params = nnx.state(model, nnx.Param)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    cfg = model.config
    return (
        f"SD3 transformer: {cfg.num_layers} blocks ({len(cfg.dual_attention_layers)} dual-attention), "
        f"width {cfg.inner_dim}, {cfg.num_attention_heads} heads, qk_norm={cfg.qk_norm}, "
        f"{count / 1e6:.1f}M parameters, stacks {[(n, 'dual' if d else 'pre_only' if p else 'joint') for _, n, d, p in cfg.stack_layout()]}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flowjax.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-transformer", help="diffusers transformer folder -> flowjax model folder")
    imp.add_argument("src", help="diffusers folder with config.json + diffusion_pytorch_model*.safetensors")
    imp.add_argument("dst", help="new flowjax model folder")
    imp.add_argument("--param-dtype", choices=DTYPES, default="float32", help="dtype the weights are stored in")
    exp = sub.add_parser("export-transformer", help="flowjax model folder -> diffusers transformer folder")
    exp.add_argument("src", help="flowjax model folder (from import-transformer or training)")
    exp.add_argument("dst", help="output folder for SD3Transformer2DModel.from_pretrained")
    exp.add_argument("--dtype", choices=DTYPES, default=None, help="write weights in this dtype (default: as stored)")
    exp.add_argument("--max-shard-size", default=None, help="split into shards of at most this size, e.g. 5GB")
    ins = sub.add_parser("inspect", help="validate a diffusers transformer folder and print its summary")
    ins.add_argument("src")
    args = parser.parse_args(argv)

    from flowjax import checkpoint
    from flowjax.convert import CheckpointError, load_transformer, save_transformer

    try:
        if args.command == "import-transformer":
            model = load_transformer(args.src, param_dtype=DTYPES[args.param_dtype], progress=True)
            out = checkpoint.save_model(model, args.dst)
            print(f"{_summary(model)}\nwrote {out}")
        elif args.command == "export-transformer":
            model = checkpoint.load_model(args.src)
            dtype = DTYPES[args.dtype] if args.dtype else None
            out = save_transformer(model, args.dst, dtype=dtype, max_shard_bytes=_parse_size(args.max_shard_size))
            print(f"{_summary(model)}\nwrote {out}")
        else:
            print(_summary(load_transformer(args.src, param_dtype=jnp.float32, progress=True)))
    except (CheckpointError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
