"""python -m flowjax.compare --config=configs/shapes.py --workdir=runs/compare [--variants=grpo,cps,mixgrpo,awm,nft]

Runs every method variant of a config with the same budget (the config's `train.steps` x batch, or
`--steps`), for each of `--seeds`, one workdir each (rerunning resumes or skips finished runs), then draws
held-out accuracy (mean over seeds, min-max band) against the number of sampled images, against model
evaluations (NFEs: transformer forward passes of rollouts and training, a CFG pair counting 2) and against
training wall-clock time, one line per method: the small-scale analogue of the AWM / DiffusionNFT speed-up
claims over Flow-GRPO. Writes WORKDIR/comparison.png and WORKDIR/comparison.md (mean +- sd over seeds).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from absl import app, flags

from flowjax import plots

_CONFIG = flags.DEFINE_string("config", "configs/shapes.py", "config file with variants (get_config(variant))")
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder; one subfolder per variant")
_VARIANTS = flags.DEFINE_list("variants", None, "variants to run (default: the config's VARIANTS)")
_STEPS = flags.DEFINE_integer("steps", None, "training steps per variant (default: the config's train.steps)")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "seeds per variant; curves show the mean")
_OVERRIDES = flags.DEFINE_multi_string("set", [], "config overrides KEY=VALUE applied to every variant, "
                                       "e.g. --set=train.lr=3e-4")
flags.mark_flags_as_required(["workdir"])

LABELS = {"grpo": "Flow-GRPO (SDE)", "cps": "Flow-GRPO (CPS)", "mixgrpo": "MixGRPO (SDE window)",
          "awm": "AWM", "nft": "DiffusionNFT", "dance": "DanceGRPO", "tempflow": "TempFlow-GRPO",
          "gdro": "GDRO (online)", "gdro_offline": "GDRO (offline)", "euphonium": "Euphonium"}
AXES = ("sampled images", "model evaluations (NFEs)", "training wall-clock (s)")


def load_config_module(path: str):
    spec = importlib.util.spec_from_file_location("flowjax_compare_config", path)
    if spec is None or not Path(path).is_file():
        raise FileNotFoundError(f"no config file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _apply_override(config, item: str):
    key, sep, value = item.partition("=")
    if not sep:
        raise ValueError(f"--set needs KEY=VALUE, got {item!r}")
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    old = node[leaf]
    node[leaf] = type(old)(value) if not isinstance(old, bool) else value.lower() in ("1", "true", "yes")


def curves(metrics_path: Path, batch_size: int):
    """[evals, 4]: (images sampled, NFEs, wall-clock seconds of training, held-out accuracy) at each evaluation.
    An offline run logs its dataset once (images/sampled, nfe/dataset, in that step's time) and 0 images after."""
    rows = plots.read_metrics(metrics_path)
    elapsed, nfes, images, out = 0.0, 0.0, 0, []
    for r in rows:
        elapsed += r.get("time/step_s", 0.0)
        nfes += r.get("nfe/rollout", 0.0) + r.get("nfe/train", 0.0) + r.get("nfe/dataset", 0.0)
        if "time/step_s" in r:  # a training step (the step-0 row is an evaluation only)
            images += r.get("images/sampled", batch_size)
        if "eval/accuracy" in r:
            out.append((images, nfes, elapsed, r["eval/accuracy"]))
    return np.asarray(out)


def run_variant(module, variant: str, seed: int, workdir: Path, steps: int | None, overrides) -> tuple[Path, int]:
    from flowjax.train import build

    config = module.get_config(variant)
    config.seed = seed
    if steps is not None:
        config.train.steps = steps
    for item in overrides:
        _apply_override(config, item)
    trainer = build(config, workdir)
    try:
        if int(trainer.state.step) < config.train.steps:
            trainer.train()
    finally:
        trainer.close()
    # Images sampled (and scored) per epoch: the batch, or every branch's final image (TempFlow-GRPO).
    return workdir / "metrics.jsonl", trainer.method.rows(trainer.batch_size)


def draw(results: dict[str, list[np.ndarray]], path: Path, title: str) -> dict[str, dict]:
    """The two-panel comparison figure; returns per-variant summary numbers."""
    fig, axes = plots.plt.subplots(1, 3, figsize=(15, 4))
    summary = {}
    for variant, runs in results.items():
        n = min(len(r) for r in runs)
        stack = np.stack([r[:n] for r in runs])  # [seeds, evals, 4]
        mean = stack.mean(0)
        label = LABELS.get(variant, variant)
        for col, ax in enumerate(axes):
            ax.plot(mean[:, col], mean[:, 3], marker="o", markersize=3, label=label)
            if len(runs) > 1:
                ax.fill_between(mean[:, col], stack[:, :, 3].min(0), stack[:, :, 3].max(0), alpha=0.15)
        gains = stack[:, -1, 3] - stack[:, 0, 3]
        summary[variant] = dict(start=float(stack[:, 0, 3].mean()), end=float(stack[:, -1, 3].mean()),
                                end_sd=float(stack[:, -1, 3].std(ddof=1)) if len(runs) > 1 else 0.0,
                                gain=float(gains.mean()), gain_sd=float(gains.std(ddof=1)) if len(runs) > 1 else 0.0,
                                images=int(mean[-1, 0]), nfes=float(mean[-1, 1]), train_minutes=float(mean[-1, 2] / 60),
                                seeds=len(runs))
    for ax, name in zip(axes, AXES):
        ax.set_xlabel(name)
        ax.set_ylabel("held-out strict accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plots.plt.close(fig)
    return summary


def table(summary: dict[str, dict], steps: int | None = None) -> str:
    """Markdown: accuracy before / after and the gain as mean +- sd over seeds, NFEs, time, images."""
    lines = ["| method | seeds | accuracy before | accuracy after | gain | NFEs per epoch | training time (min) "
             "| sampled images |", "|---|---|---|---|---|---|---|---|"]
    pm = lambda m, sd, n, fmt: f"{m:{fmt}} ± {sd:.3f}" if n > 1 else f"{m:{fmt}}"
    for v, s in summary.items():
        per_epoch = f"{s['nfes'] / steps:,.0f}" if steps else f"{s['nfes']:,.0f} (total)"
        lines.append(f"| {LABELS.get(v, v)} | {s['seeds']} | {s['start']:.3f} | {pm(s['end'], s['end_sd'], s['seeds'], '.3f')} "
                     f"| {pm(s['gain'], s['gain_sd'], s['seeds'], '+.3f')} | {per_epoch} | {s['train_minutes']:.1f} "
                     f"| {s['images']} |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    module = load_config_module(_CONFIG.value)
    variants = _VARIANTS.value or list(module.VARIANTS)
    unknown = sorted(set(variants) - set(module.VARIANTS))
    if unknown:
        raise ValueError(f"variants {unknown} are not in {_CONFIG.value} (it has {module.VARIANTS})")
    root = Path(_WORKDIR.value)
    results: dict[str, list[np.ndarray]] = {}
    for variant in variants:
        for seed in (int(s) for s in _SEEDS.value):
            metrics, batch = run_variant(module, variant, seed, root / f"{variant}_seed{seed}", _STEPS.value,
                                         _OVERRIDES.value)
            results.setdefault(variant, []).append(curves(metrics, batch))
    summary = draw(results, root / "comparison.png", f"{Path(_CONFIG.value).stem}: held-out accuracy, same budget")
    steps = _STEPS.value or module.get_config(variants[0]).train.steps
    (root / "comparison.md").write_text(table(summary, steps))
    print(table(summary, steps))
    print(f"wrote {root / 'comparison.png'} and {root / 'comparison.md'}")


if __name__ == "__main__":
    app.run(main)
