"""metrics.jsonl (one JSON object per logged step) and TensorBoard events of a training run."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsWriter:
    """metrics.jsonl, one JSON object per logged step; on resume, lines past the restored step go
    (a fresh start, `restored_step` None, starts a fresh file)."""

    def __init__(self, path: Path, restored_step: int | None, enabled: bool, tensorboard: bool = True):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            last = -1 if restored_step is None else restored_step
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= last]
            path.write_text("".join(ln + "\n" for ln in kept))
        self.tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(path.parent / "tensorboard"), purge_step=(restored_step or 0) + 1)

    def write(self, step: int, metrics: dict) -> None:
        if self.enabled:
            row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            if self.tb is not None:
                for k, v in row.items():
                    if k != "step":
                        self.tb.add_scalar(k, v, int(step))
                self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()
