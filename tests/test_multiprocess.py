"""Two processes on localhost (jax.distributed, 4 CPU devices each) train as one 8-device run."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_trainer import build, read_metrics, toy

WORKER = Path(__file__).with_name("multiprocess_worker.py")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two processes x (compile + 2 epochs) and the one-process run: ~5-10 min on 2 cores
def test_two_processes_match_one(tmp_path):
    coordinator = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), coordinator, str(i), str(tmp_path / "two"), "2"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=1500)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]

    c = toy.get_config("grpo")
    c.train.steps, c.eval_every = 2, 2
    trainer = build(c, tmp_path / "one")  # this process: 8 simulated devices, the same mesh shape
    trainer.train()
    trainer.close()
    two, one = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(one, two):
        for key in ("reward/mean", "eval/reward_mean", "policy_loss", "grad_norm"):
            if key in a:
                np.testing.assert_allclose(b[key], a[key], rtol=2e-3, atol=1e-5, err_msg=key)
