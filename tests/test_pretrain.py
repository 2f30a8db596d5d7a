"""python -m flowjax.pretrain: flow-matching pretraining of the shapes world's base model, end to end on a
tiny config (text encoder + MMDiT trained jointly, evaluation, grids, the diffusers-format base folder)."""

import sys
from pathlib import Path

from flowjax.worlds.shapes import load_base

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_runs import rows, run  # noqa: E402


def test_pretrain_entry_point_writes_a_loadable_base(tmp_path):
    run("-m", "flowjax.pretrain", "--config=configs/shapes_pretrain.py", f"--workdir={tmp_path}",
        "--config.train.steps=4", "--config.train.warmup_steps=1", "--config.train.batch_size=8",
        "--config.log_every=2", "--config.eval.every=4", "--config.eval.num_steps=2", "--config.eval.grid_size=4",
        "--config.model.num_layers=1", "--config.text_encoder.num_hidden_layers=1")
    r = rows(tmp_path)
    assert [x["step"] for x in r] == [2, 4] and "eval/accuracy_counting" in r[-1]
    assert (tmp_path / "samples" / "step_000004.png").is_file() and (tmp_path / "pretrain_curves.png").is_file()
    _, transformer, meta = load_base(tmp_path / "base")
    assert transformer.config.num_layers == 1 and meta["pretrain"]["steps"] == 4
