"""Running flowjax's command-line entry points from tests, as a user would: a subprocess in the repository
on one CPU device, and the metrics.jsonl it writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}  # one CPU device, as on a laptop


def run(*args, cwd=ROOT, timeout=900):
    """`python *args`; fails the test with the end of stdout and stderr when it exits non-zero."""
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def rows(workdir):
    """The rows of WORKDIR/metrics.jsonl."""
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
