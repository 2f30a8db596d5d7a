"""python -m flowjax.plan: ahead-of-time compilation of the trainer's programs for TPU topologies, on this CPU
machine, with the TPU compiler of the libtpu package (a test dependency). The SD3.5-M plans are --runslow."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from configs import toy
from flowjax import plan as plan_lib

pytest.importorskip("libtpu", reason="flowjax.plan needs the TPU compiler: pip install -e '.[plan]'")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_runs import ENV, ROOT  # noqa: E402

FINAL = re.compile(r"^plan: (\S+) on (\S+) \((\d+) chips\): peak ([\d.]+) GiB per chip of ([\d.]+) GiB: (fits|does not fit)$")


@pytest.mark.parametrize("name, jax_name, chips", [
    ("v5e-8", "v5e:2x4", 8), ("v5litepod-16", "v5e:4x4", 16), ("v5p-16", "v5p:2x2x2", 8), ("v4-32", "v4:2x2x4", 16),
    ("v6e-8", "v6e:2x4", 8), ("v5e:2x2", "v5e:2x2", 4)])
def test_topology_names(name, jax_name, chips):
    t = plan_lib.parse_topology(name)
    assert (t.jax_name, t.chips) == (jax_name, chips)


def test_unknown_topologies_are_refused():
    with pytest.raises(ValueError, match="unknown TPU topology"):
        plan_lib.parse_topology("a100-8")
    with pytest.raises(ValueError, match="no v5e slice of 6 chips"):
        plan_lib.parse_topology("v5e-6")


@pytest.fixture(scope="module")
def devices():
    return plan_lib.tpu_devices(plan_lib.parse_topology("v5e:2x2"))


@pytest.mark.parametrize("variant", ["nft", "gdro"])  # GDRO: advantages [B, 2] (reward, group) in its update
def test_toy_plan_compiles_every_program(variant, devices, tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWJAX_PLAN_CACHE", str(tmp_path))
    lines = []
    report = plan_lib.plan(toy.get_config(variant), plan_lib.parse_topology("v5e:2x2"), devices=devices,
                           log=lines.append)
    assert set(report["programs"]) == {"rollout", "reward", "update", "evaluate"}
    assert report["fits"] and not report["searched"] and report["epoch_flops"] > 0
    assert all(m["flops"] > 0 for n, m in report["programs"].items() if n != "reward")
    assert FINAL.match(lines[-1]), lines[-1]
    assert len(list(tmp_path.glob("*.json"))) == 4  # one cached measurement per program


def test_micro_batches_are_searched_when_the_batch_does_not_fit(devices, tmp_path, monkeypatch):
    """With a chip of a few MiB, the whole batch does not fit: the plan finds smaller micro-batches that do."""
    monkeypatch.setenv("FLOWJAX_PLAN_CACHE", str(tmp_path))
    whole = plan_lib.plan(toy.get_config("grpo"), plan_lib.parse_topology("v5e:2x2"), devices=devices,
                          log=lambda _: None)
    rollout = whole["programs"]["rollout"]
    tight = plan_lib.Chip(hbm=whole["peak"] * 0.6, bf16_flops=1e12, cores_per_chip=1)
    small = plan_lib.Topology("tiny-chips", "v5e:2x2", tight, 4)
    lines = []
    report = plan_lib.plan(toy.get_config("grpo"), small, devices=devices, log=lines.append)
    assert report["searched"] and 0 < report["sample_micro"] < rollout["rows"] // 4
    assert report["programs"]["rollout"]["rows"] < rollout["rows"]  # (a toy's temporaries barely follow the rows)
    assert lines[-1].endswith(": fits") == report["fits"]


def test_command_line(tmp_path):
    env = {**ENV, "FLOWJAX_PLAN_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "flowjax.plan", "--config=configs/toy.py:mixgrpo", "--topology=v5e-4"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    m = FINAL.match(last)
    assert m and m.group(2) == "v5e-4" and m.group(3) == "4" and m.group(6) == "fits", last
    help_ = subprocess.run([sys.executable, "-m", "flowjax.plan", "--help"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    assert "ahead of time" in help_.stdout + help_.stderr


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["grpo", "awm", "nft"])
def test_geneval_plans_on_v5e_8(variant, tmp_path):
    """The published GenEval recipes fit a v5e-8 (16 GiB per chip) with the micro-batches the plan finds."""
    out = subprocess.run([sys.executable, "-m", "flowjax.plan", f"--config=configs/geneval.py:{variant}",
                          "--topology=v5e-8"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=7200)
    assert out.returncode == 0, out.stderr[-3000:]
    m = FINAL.match(out.stdout.strip().splitlines()[-1])
    assert m and m.group(6) == "fits", out.stdout[-3000:]
