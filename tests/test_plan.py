"""python -m flowjax.plan: ahead-of-time compilation of the trainer's programs for TPU topologies, on this CPU
machine, with the TPU compiler of the libtpu package (a test dependency). The SD3.5-M and FLUX.1-dev plans are
--runslow."""

import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from configs import flux_geneval, geneval, toy
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


def test_both_forms_of_the_compilers_hbm_refusal_are_read():
    # libtpu 0.0.42's two wordings (abbreviated from refusals seen here: a toy chip, and SD3.5-M's update on v5e-8)
    short = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. The total "
             "memory required for HLO temporaries (20.89G) exceeds available HBM (15.75G)")
    report = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out of memory in "
              "memory space hbm. Used 15.83G of 15.75G hbm. Exceeded hbm capacity by 79.41M.\n\nTotal hbm usage "
              ">= 15.87G:\n    reserved        258.00M \n    program          14.49G \n    arguments         1.13G "
              "\n\nProgram hbm requirement 14.49G:\n    global            4.38M\n    scoped            1.05M\n"
              "    HLO temp         14.38G (99.3% utilization)")
    assert plan_lib.oom_request(short) == ("HLO temporaries", 20.89 * 2**30)
    assert plan_lib.oom_request(report) == ("HLO temp", 14.38 * 2**30)
    assert plan_lib.oom_request("INTERNAL: something else (3.0G)") is None


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
    assert all(m["model_flops"] > 0 for n, m in report["programs"].items() if n != "reward")
    assert FINAL.match(lines[-1]), lines[-1]
    assert len(list(tmp_path.glob("*.json"))) == 4  # one cached measurement per program
    # FLOPs are counted with the sampler's loop multiplied out: twice the steps, twice the rollout's matmuls
    # (XLA's cost analysis counts a loop body once and would report the same number for both).
    longer = toy.get_config(variant)
    longer.sample.num_steps *= 2
    twice = plan_lib.plan(longer, plan_lib.parse_topology("v5e:2x2"), devices=devices, log=lambda _: None)
    assert twice["programs"]["rollout"]["model_flops"] == pytest.approx(
        2 * report["programs"]["rollout"]["model_flops"], rel=1e-6)


def _deep_stack(fn):
    """fn() in a thread with a 512 MiB stack, as `python -m flowjax.plan` runs (the TPU compiler's convolution
    emitter recurses deeply)."""
    box = {}

    def work():
        try:
            box["out"] = fn()
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    threading.stack_size(512 * 1024 * 1024)
    try:
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    finally:
        threading.stack_size(0)
    if "error" in box:
        raise box["error"]
    return box["out"]


def _tiny_flux(config):
    """A FLUX config at toy scale: 64 px (8x8 latents), 16 T5 tokens, 16 images per epoch, 3 steps."""
    config.world.resolution, config.sample.latent_size = 64, (8, 8)
    config.world.max_sequence_length = 16
    config.world.generate_train, config.world.generate_test = 16, 4
    t = config.train
    t.prompts_per_batch, t.group_size, t.minibatches, t.grad_accum = 4, 4, 2, 1
    config.sample.num_steps = config.sample.eval_num_steps = 3
    config.lora.rank, config.lora.alpha = 4, 8.0
    return config


def test_flux_plan_compiles_every_program(devices, tmp_path, monkeypatch):
    """configs/flux_geneval.py (FLUX.1-dev's Flow-GRPO recipe: embedded guidance, dynamic shift, chunked attention,
    full remat) with the flux-tiny transformer and VAE: the world gives the trainer FLUX's conditioning shapes
    (T5 tokens only, CLIP-L pooled), its guidance and its schedule, and every program compiles for v5e:2x2."""
    from flowjax import sampling
    from flowjax import sharding as sharding_lib

    monkeypatch.setenv("FLOWJAX_PLAN_CACHE", str(tmp_path))
    config = _tiny_flux(flux_geneval.get_config("grpo"))
    trainer, extra = plan_lib.build_abstract(config, sharding_lib.make_mesh(dict(config.mesh), devices=devices),
                                             preset="flux-tiny")
    world = trainer.world
    assert world.cond_shapes == ((16, 256), (64,)) and world.channels == 16 and world.model_guidance == 3.5
    mu = sampling.flux_mu(16)  # (8/2) x (8/2) packed image tokens, FluxPipeline's default schedule
    assert trainer.eval_sigmas.tolist() == sampling.flux_sigmas(3, mu=mu).tolist()
    assert list(extra) == []  # 16 prompts are encoded up front: no text encoders resident
    lines = []
    report = _deep_stack(lambda: plan_lib.plan(config, plan_lib.parse_topology("v5e:2x2"), name="flux-tiny",
                                               preset="flux-tiny", devices=devices, log=lines.append))
    assert set(report["programs"]) == {"rollout", "reward", "update", "evaluate"}
    assert report["fits"] and not report["searched"] and report["epoch_flops"] > 0
    assert all(m["model_flops"] > 0 for n, m in report["programs"].items())
    m = FINAL.match(lines[-1])
    assert m and m.groups()[:3] == ("flux-tiny", "v5e:2x2", "4") and m.group(6) == "fits", lines[-1]
    assert len(list(tmp_path.glob("*.json"))) == 4  # one cached measurement per program
    with pytest.raises(ValueError, match="--preset must be one of"):
        plan_lib.build_abstract(config, trainer.mesh, preset="sd35-medium")


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


@pytest.mark.slow
@pytest.mark.parametrize("config", ["flux_pickscore.py:grpo", "flux_geneval.py:grpo"])
def test_flux_dev_plans_on_v5p_8(config, tmp_path):
    """FLUX.1-dev's Flow-GRPO recipes (the flux-dev preset: 12 B parameters, 512 px, 512 T5 tokens) plan on a v5p-8."""
    out = subprocess.run([sys.executable, "-m", "flowjax.plan", f"--config=configs/{config}", "--topology=v5p-8"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=7200)
    assert out.returncode == 0, out.stderr[-3000:]
    m = FINAL.match(out.stdout.strip().splitlines()[-1])
    assert m and m.group(2) == "v5p-8", out.stdout[-3000:]


def test_the_ocr_reward_is_planned_with_its_networks():
    """configs/ocr.py's reward runs PP-OCRv4 inside the reward program: the plan traces it with the installed
    networks' shapes (no weights), the host box post-processing as a callback."""
    for module in ("onnx", "cv2", "pyclipper", "rapidocr_onnxruntime"):
        pytest.importorskip(module)
    import jax
    import jax.numpy as jnp

    from configs import ocr

    reward = plan_lib._jittable_reward(ocr.get_config("grpo"))
    assert reward.token_width == 65 and all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(reward.params))
    images = jax.ShapeDtypeStruct((2, 512, 512, 3), jnp.float32)
    out = jax.eval_shape(reward.score, reward.params, images, jax.ShapeDtypeStruct((2, 65), jnp.int32))
    assert out.shape == (2,)
    assert plan_lib._jittable_reward(geneval.get_config("grpo")) is None  # a host reward: decoded images only
