"""Running flowjax's command-line entry points from tests, as a user would: a subprocess in the repository
on one CPU device, and the metrics.jsonl it writes."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# One CPU device, as on a laptop. The command-line runs share the suite's persistent compilation cache
# (tests/conftest.py): the demo, compare, notebook and CLI tests build the same shapes programs, and a 2-epoch
# shapes run took 279 s compiling them and 63 s with them cached.
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
       "JAX_COMPILATION_CACHE_DIR": os.environ.get(
           "FLOWJAX_TEST_COMPILE_CACHE", os.path.join(tempfile.gettempdir(), "flowjax-test-compile-cache")),
       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}


def run(*args, cwd=ROOT, timeout=900):
    """`python *args`; fails the test with the end of stdout and stderr when it exits non-zero."""
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def rows(workdir):
    """The rows of WORKDIR/metrics.jsonl."""
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
