"""The RL loop end to end on the toy world: rewards rise, on-policy ratio, sharding, resume, config checks."""

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import toy
from flowjax import sharding
from flowjax.rl import awm_ema_decay, old_policy_decay
from flowjax.rl.optim import learning_rate
from flowjax.rl.trainer import validate
from flowjax.train import build

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_runs import rows as read_metrics  # noqa: E402


def config(variant="grpo", **train):
    c = toy.get_config(variant)
    c.train.update(train)
    return c


def single_device_mesh():
    return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


@pytest.mark.parametrize("variant", ["grpo", "cps", "awm", "nft"])
def test_reward_rises(tmp_path, variant):
    c = config(variant, steps=20)
    trainer = build(c, tmp_path, mesh=single_device_mesh())
    trainer.train()
    trainer.close()
    rows = read_metrics(tmp_path)
    train = [r["reward/mean"] for r in rows if "reward/mean" in r]
    evals = [r["eval/reward_mean"] for r in rows if "eval/reward_mean" in r]
    first, last = np.mean(train[:5]), np.mean(train[-5:])
    print(f"{variant}: train reward {first:.3f} -> {last:.3f}, eval {evals[0]:.3f} -> {evals[-1]:.3f}")
    assert last > first + 0.1
    assert evals[-1] > evals[0]
    if variant == "awm":  # the KL-EMA decay runs on the optimizer-step clock (train_sd3_awm.py, be51372)
        for r in rows[1:]:
            assert r["ema/decay"] == pytest.approx(float(awm_ema_decay(r["train/opt_steps"])))
        assert rows[-1]["train/opt_steps"] == 20 * c.train.minibatches // c.train.grad_accum


def test_first_update_is_on_policy(tmp_path):
    c = config("grpo", minibatches=1)
    trainer = build(c, tmp_path, mesh=single_device_mesh())
    metrics = trainer.train_step()
    trainer.close()
    # The rollout's log-probs and the training recomputation come from the same parameters and the same kernel
    # code, so the ratio is 1 up to the float32 rounding of a recomputation in another program (ratio_min /
    # ratio_max, the extremes over all trained steps and rows: 1 -/+ 1.2e-7 here).
    assert abs(metrics["ratio_min"] - 1.0) < 1e-6 and abs(metrics["ratio_max"] - 1.0) < 1e-6
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-7)
    assert metrics["clipfrac"] == 0.0


def test_sharded_run_matches_single_device(tmp_path):
    runs = {}
    for name, mesh in (("one", single_device_mesh()), ("eight", sharding.make_mesh({"data": 2, "fsdp": 4}))):
        c = config("grpo", steps=3)
        c.eval_every = 3
        trainer = build(c, tmp_path / name, mesh=mesh)
        trainer.train()
        trainer.close()
        runs[name] = read_metrics(tmp_path / name)
    for a, b in zip(runs["one"], runs["eight"], strict=True):
        for key in ("reward/mean", "eval/reward_mean", "policy_loss", "grad_norm"):
            if key in a:
                np.testing.assert_allclose(b[key], a[key], rtol=2e-3, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("world, variant", [("toy", "grpo"), pytest.param("toy", "nft", marks=pytest.mark.slow),
                                            ("shapes", "grpo")])
def test_micro_batches_give_the_same_metrics(tmp_path, world, variant):
    """Rollout, reward and evaluation in sample.micro_batch calls and gradients in train.micro_batch calls:
    the same noise and keys per row, so the same metrics as one call each (up to float32 summation order)."""
    from configs import shapes

    runs = {}
    for name, micro in (("whole", (0, 0)), ("micro", (2, 1))):  # 2 rollout calls, 2 gradient calls per minibatch
        c = (toy if world == "toy" else shapes).get_config(variant)
        c.train.update(steps=2, prompts_per_batch=8, minibatches=2)  # 32 rows: 4 per device, 16 per minibatch
        c.eval_every = 2
        if world == "shapes":
            c.train.update(steps=1, prompts_per_batch=4, group_size=8)
            c.eval_every, c.sample.num_eval_prompts = 1, 8
        c.sample.micro_batch, c.train.micro_batch = micro
        trainer = build(c, tmp_path / name)  # 8 devices
        trainer.train()
        trainer.close()
        runs[name] = read_metrics(tmp_path / name)
    for a, b in zip(runs["whole"], runs["micro"], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if not key.startswith("time/"):
                np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_resume_continues_exactly(tmp_path):
    def run(workdir, steps_now):
        c = config("nft", steps=4)
        c.checkpoint_every = 2
        trainer = build(c, workdir, mesh=single_device_mesh())
        trainer.train(num_steps=steps_now)
        trainer.close()

    run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 3)  # checkpoints at 2 and 3 ("killed" after step 3)
    (tmp_path / "resumed" / "metrics.jsonl").open("a").write('{"step": 4, "reward/mean": -1}\n')  # a half-written step
    # The newest checkpoint is damaged: the run moves it aside, resumes from step 2 and redoes step 3 exactly.
    damaged = tmp_path / "resumed" / "checkpoints" / "3"
    for f in (f for f in damaged.rglob("*") if f.is_file() and f.stat().st_size > 0):
        f.write_bytes(b"\0" * 7)
    run(tmp_path / "resumed", 4)
    aside = list((tmp_path / "resumed" / "damaged_checkpoints").glob("3-*"))
    assert len(aside) == 1 and not damaged.exists() and "step 3" in (aside[0].parent / "log.txt").read_text()
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in b] == [r["step"] for r in a] == [0, 1, 2, 3, 4]
    # DiffusionNFT's old policy decays on the optimizer-step clock, 2 steps per epoch here
    # (train_nft_sd3.py `return_decay(global_step, decay_type)`, NVlabs/DiffusionNFT 24af555)
    for r in a[1:]:
        assert r["train/opt_steps"] == 2 * r["step"]
        assert r["old_policy/decay"] == pytest.approx(float(old_policy_decay(2 * r["step"], 1)))
    assert "eval_ema/reward_mean" in a[0] and "eval_ema/reward_mean" in a[-1]
    for ra, rb in zip(a, b):
        for key in ra:
            if not key.startswith("time/"):
                np.testing.assert_allclose(rb[key], ra[key], rtol=1e-6, err_msg=f"step {ra['step']} {key}")


@pytest.mark.parametrize("variant, edit, message", [
    ("grpo", lambda c: c.grpo.update(kind="ode"), "stochastic sampler"),
    ("grpo", lambda c: c.grpo.update(noise_level=0.0), "must be > 0"),
    ("nft", lambda c: c.nft.update(guidance=4.5), "CFG-free"),
    ("grpo", lambda c: c.train.update(minibatches=3), "not divisible"),
    ("grpo", lambda c: c.train.update(grad_accum=3), "never crosses an epoch"),
    ("grpo", lambda c: c.update(method="ppo"), "method must be one of"),
    ("grpo", lambda c: c.train.update(lr_schedule="linear"), "lr_schedule must be one of"),
    ("mixgrpo", lambda c: c.grpo.window.update(range=(0, c.sample.num_steps)), "final step"),
    ("grpo", lambda c: c.advantage.update(std="median"), "advantage.std"),
    ("awm", lambda c: c.awm.update(time_type="uniform"), "time_type"),
    ("nft", lambda c: c.nft.update(decay_type=5), "decay_type"),
    ("grpo", lambda c: c.grpo.eval_ema.update(cadence="hourly"), "cadence"),
])
def test_invalid_configs_are_refused(variant, edit, message):
    c = config(variant)
    edit(c)
    with pytest.raises(ValueError, match=message):
        validate(c)


def test_cosine_learning_rate_decays_to_zero_over_the_run():
    c = config("grpo", steps=10, minibatches=2)
    assert learning_rate(c.train) == c.train.lr  # constant unless asked
    c.train.lr_schedule = "cosine"
    lr = learning_rate(c.train)
    updates = c.train.steps * c.train.minibatches // c.train.grad_accum
    np.testing.assert_allclose([lr(0), lr(updates // 2), lr(updates)], [c.train.lr, c.train.lr / 2, 0.0], atol=1e-12)


def test_batch_must_fit_the_devices(tmp_path):
    c = config("grpo", prompts_per_batch=3, group_size=2, minibatches=1)
    with pytest.raises(ValueError, match="data-parallel devices"):
        build(c, tmp_path, mesh=sharding.make_mesh({"fsdp": 4}, devices=jax.devices()[:4]))


def test_command_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "flowjax.train", "--config=configs/toy.py:mixgrpo", f"--workdir={tmp_path}",
         "--config.train.steps=2", "--config.mesh.fsdp=1"],
        capture_output=True, text=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""}, cwd=".",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_metrics(tmp_path)
    assert rows[0]["step"] == 0 and "eval/reward_mean" in rows[0] and rows[-1]["step"] == 2
    assert "eval_ema/reward_mean" in rows[0] and "train/kept_fraction" in rows[1]
    assert (tmp_path / "checkpoints").is_dir()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_unreadable_checkpoints_stop_with_a_message(tmp_path):
    c = config("grpo", steps=1)
    c.checkpoint_every, c.eval_every = 1, 1
    trainer = build(c, tmp_path, mesh=single_device_mesh())
    trainer.train()
    trainer.close()
    for f in (f for f in (tmp_path / "checkpoints").rglob("*") if f.is_file() and f.stat().st_size > 0):
        f.write_bytes(b"\0")
    with pytest.raises(RuntimeError, match="no checkpoint in .*checkpoints can be read"):
        build(c, tmp_path, mesh=single_device_mesh())


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_exactly(tmp_path):
    """Training killed with SIGKILL at random moments (checkpoint saves included: one per step here) and
    restarted until it finishes logs exactly what a straight run logs."""
    import os
    import signal
    import time as time_

    from cli_runs import ENV, ROOT

    args = lambda workdir: [sys.executable, "-m", "flowjax.train", "--config=configs/toy.py:nft", f"--workdir={workdir}",
                            "--config.train.steps=8", "--config.checkpoint_every=1", "--config.eval_every=4",
                            "--config.tensorboard=False"]
    subprocess.run(args(tmp_path / "straight"), cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=1200)
    killed = tmp_path / "killed"
    saved = lambda: max((int(p.name.split(".")[0]) for p in (killed / "checkpoints").glob("[0-9]*")),
                        default=-1)  # the newest save, finished or in flight
    rng, kills = np.random.default_rng(0), 0
    while True:
        proc = subprocess.Popen(args(killed), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if kills < 3:  # kill it a random 0-6 s after its next checkpoint save starts (saves are every step)
            start = saved()
            while proc.poll() is None and saved() <= start:
                time_.sleep(0.1)
            time_.sleep(float(rng.uniform(0, 6)))
        if proc.poll() is not None or kills >= 3:  # finished, or the last start: run to the end
            assert proc.wait(timeout=1200) == 0
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills >= 2, "the run finished before it could be killed twice; lengthen it"
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "killed")
    assert [r["step"] for r in b] == [r["step"] for r in a]
    for ra, rb in zip(a, b):
        for key in ra:
            if not key.startswith("time/"):
                np.testing.assert_allclose(rb[key], ra[key], rtol=1e-6, err_msg=f"step {ra['step']} {key}")


def test_export_of_a_run_policy_and_ema(tmp_path):
    """`python -m flowjax.convert export-lora WORKDIR [--ema]` writes the run's latest policy or its EMA copy."""
    from flax import nnx
    from safetensors.numpy import load_file

    from flowjax import checkpoint
    from flowjax.convert import CheckpointError

    c = config("nft", steps=2)
    c.eval_every = 2
    trainer = build(c, tmp_path / "run", mesh=single_device_mesh())
    trainer.train()
    params, ema = jax.device_get((trainer.state.params, trainer.state.ema))
    trainer.close()
    flat = lambda tree: {k: np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(tree))}
    for use_ema, want in ((False, params), (True, ema)):
        model = checkpoint.load_trained(tmp_path / "run", ema=use_ema)
        got = flat(nnx.state(model, nnx.LoRAParam))
        assert got.keys() == flat(want).keys()
        for k, v in flat(want).items():
            np.testing.assert_array_equal(got[k], v)
    assert not all(np.array_equal(a, b) for a, b in zip(flat(params).values(), flat(ema).values()))
    run = lambda *a: subprocess.run([sys.executable, "-m", "flowjax.convert", *a], capture_output=True, text=True,
                                    env={"JAX_PLATFORMS": "cpu", "PATH": ""}, cwd=".")
    out = run("export-lora", str(tmp_path / "run"), str(tmp_path / "lora_ema"), "--ema")
    assert out.returncode == 0, out.stderr[-2000:]
    weights = load_file(str(tmp_path / "lora_ema" / "pytorch_lora_weights.safetensors"))
    assert weights and all(k.startswith("transformer.") for k in weights)
    out = run("export-lora", str(tmp_path / "run" / "policy" / "base"), str(tmp_path / "x"), "--ema")
    assert out.returncode == 2 and "need a training run" in out.stderr
    with pytest.raises(CheckpointError, match="no checkpoint at step 7"):
        checkpoint.load_trained(tmp_path / "run", step=7)
