"""The SD3 configs (configs/geneval.py, ocr.py, pickscore.py): every variant builds and validates with the
published settings, and each file runs one real training step (rollout, VAE decode, reward, update,
evaluation) on a tiny random SD3 pipeline, with the GenEval and OCR rewards served by local fake servers
and PickScore from a tiny random CLIPModel folder."""

import http.server
import io
import json
import math
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import flux_geneval, flux_pickscore, geneval, ocr, pickscore
from flowjax import sharding
from flowjax.rl.trainer import validate
from flowjax.train import build

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_sd3 import save_tiny_sd3, write_clip_vocab  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"geneval": geneval, "ocr": ocr, "pickscore": pickscore}
SD3_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
               "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")


# ----------------------------------------------------------------------------- published settings


@pytest.mark.parametrize("name,variant", [(n, v) for n, m in CONFIGS.items() for v in m.VARIANTS])
def test_every_variant_builds_and_validates(name, variant):
    """Each variant carries its reference's published SD3.5-M recipe (sources in flowjax/recipes.py)."""
    c = CONFIGS[name].get_config(variant)
    validate(c)
    assert c.world.name == "sd3" and c.world.model == "" and c.world.resolution == 512
    assert tuple(c.sample.latent_size) == (64, 64) and c.sample.shift == 3.0 and c.sample.eval_num_steps == 40
    assert c.train.lr == 3e-4 and c.train.weight_decay == 1e-4
    assert c.train.max_grad_norm == 1.0 and c.world.max_sequence_length == 128
    assert (c.lora.rank, c.lora.alpha, tuple(c.lora.targets)) == (32, 64.0, SD3_TARGETS)
    # every reference: global_std=True, but TempFlow-GRPO's *_sd3_pr (a std per group) and Euphonium (per group,
    # torch.std + 1e-8: grpo_training/trainer.py, d9f2c39)
    assert c.advantage.to_dict() == {"tempflow": {"std": "per_prompt", "ddof": 0, "eps": 1e-4},
                                     "euphonium": {"std": "per_prompt", "ddof": 1, "eps": 1e-8}}.get(
        c.method, {"std": "global", "ddof": 0, "eps": 1e-4})
    batch = c.train.prompts_per_batch * c.train.group_size
    assert batch % c.train.minibatches == 0 and c.train.minibatches % c.train.grad_accum == 0
    steps_per_epoch = c.train.minibatches // c.train.grad_accum
    m = c[c.method]
    if c.method == "grpo":  # Flow-GRPO config/grpo.py (ac4c86e), FlowCPS (b402c7a), flow_grpo fast (74db691)
        assert c.sample.num_steps == 10 and steps_per_epoch == 2 and c.eval_every == 60
        assert m.eval_ema.to_dict() == {"decay": 0.9, "every": 8, "cadence": "microbatch"}
        assert m.filter_zero_advantage and m.adv_clip == 5.0
        if variant == "cps_fast":
            assert (m.kind, m.noise_level, m.guidance, c.sample.eval_guidance) == ("cps", 0.8, 1.0, 1.0)
            assert (m.clip_range, m.beta) == (1e-5, 0.0)
            assert (m.window.size, m.window.schedule, tuple(m.window.range)) == (3, "random", (0, 5))
            assert (c.train.prompts_per_batch, c.train.group_size) == ({"geneval": (48, 24), "pickscore": (64, 18)}[name])
        else:
            assert (m.guidance, c.sample.eval_guidance, m.clip_range) == (4.5, 4.5, 1e-4)
            assert (m.kind, m.noise_level) == (("cps", 0.7) if variant == "cps" else ("sde", 0.7))
            assert m.beta == (0.01 if name == "pickscore" else 0.04) and m.timestep_fraction == 0.99
            assert int(c.sample.num_steps * m.timestep_fraction) == 9 and m.window.size == 0
            assert (c.train.prompts_per_batch, c.train.group_size) == (48, 24)
    elif c.method == "awm":  # AWM config/dgx_awm.py *_no_cfg_4nodes (be51372)
        assert c.sample.num_steps == 14 and m.guidance == c.sample.eval_guidance == 1.0 and steps_per_epoch == 1
        assert (m.beta, m.time_type, m.rows_per_draw, c.eval_every) == {
            "geneval": (0.001, "discrete_wo_init", 3, 50), "ocr": (0.003, "discrete_wo_init", 3, 20),
            "pickscore": (1e-4, "discrete", 2, 50)}[name]
        assert (c.train.prompts_per_batch, c.train.group_size) == ((24, 24) if name == "pickscore" else (72, 24))
        assert batch // c.train.minibatches == (64 if name == "pickscore" else 96)  # 32 GPUs x 2 or 3 rows
        assert (m.p, m.ema_beta, m.clip_range, m.adv_scale, m.adv_clip, m.num_train_timesteps) == (
            0.25, 1.0, 1.0, 5.0, 1.0, 6)
        assert m.eval_ema.to_dict() == {"decay": 0.99, "every": 1, "cadence": "epoch"}
    elif c.method == "tempflow":  # TempFlow-GRPO config/dgx.py *_sd3_pr (63e4def), train_sd3_pr.py (e66824e)
        assert c.sample.num_steps == 10 and steps_per_epoch == 2 and c.eval_every == 20
        assert (c.train.prompts_per_batch, c.train.group_size, m.branches) == (8, 4, 6)
        assert (m.noise_level, m.guidance, c.sample.eval_guidance) == (0.7, 4.5, 4.5)
        assert (m.clip_range, m.adv_clip, m.filter_zero_advantage) == (1e-4, 5.0, True)
        assert m.beta == (0.001 if name == "pickscore" else 0.004) and int(10 * m.timestep_fraction) == 9
        assert m.eval_ema.to_dict() == {"decay": 0.9, "every": 8, "cadence": "microbatch"}
        assert 8 * 4 * 6 // c.train.minibatches == 48  # (seed, branch) units per minibatch: 8 GPUs x 6
    elif c.method == "euphonium":  # scripts/train_grpo_hunyuan.sh (d9f2c39); the rest chosen (flowjax/recipes.py)
        assert (c.sample.num_steps, m.kind, m.noise_level, m.schedule, m.random_steps) == (16, "dance", 0.25, "dance", True)
        assert (m.timestep_fraction, m.clip_range, m.adv_clip, m.beta, m.outcome_coef, m.process_coef) == (
            0.6, 1e-4, 5.0, 0.0, 1.0, 1.0)
        g = m.guide
        assert (g.start, g.end, g.interval, g.scale, g.kl_beta, g.delta_t) == (12, -1, 1, -1.0, 3.125, True)
        assert m.noise_level**2 / (2 * g.kl_beta) == 0.01  # the script's PROCESS_LATENT_REWARD_GUIDANCE_SCALE
        assert (m.guidance, c.sample.eval_guidance, steps_per_epoch) == (4.5, 4.5, 2)
        assert g.source == ("reward" if name == "pickscore" else "prm") and not m.filter_zero_advantage
    elif c.method == "gdro":  # GDRO arXiv 2601.02036 (k, tau, beta, gamma; the rest chosen: flowjax/recipes.py)
        assert (c.train.group_size, m.tau, m.solver, m.shared_noise) == (6, 0.05, "ode", True)
        assert (m.beta, m.gamma) == {"geneval": (6.0, 1.0), "ocr": (12.0, 0.5)}[name]
        assert m.offline == (variant == "gdro_offline") and c.train.prompts_per_batch % c.train.minibatches == 0
        assert c.sample.num_steps == (40 if m.offline else 10) and "eval_ema" not in m and c.eval_every == 60
    else:  # DiffusionNFT config/nft.py (24af555)
        assert c.sample.num_steps == 10 and m.guidance == c.sample.eval_guidance == 1.0 and c.eval_every == 10
        assert (m.mix, m.decay_type, steps_per_epoch) == {"geneval": (1.0, 1, 1), "ocr": (0.1, 2, 2),
                                                          "pickscore": (1.0, 1, 1)}[name]
        assert batch // c.train.minibatches == 72 and (m.kl_beta, m.timestep_fraction) == (1e-4, 0.99)
        assert m.eval_ema.to_dict() == {"decay": 0.9, "every": 1, "cadence": "update"}


@pytest.mark.parametrize("devices", [8, 16, 32, 64])
def test_every_recipe_starts_on_meshes_of_8_to_64_devices(devices):
    """Rollout batches divide the devices; minibatches are padded with zero-weight rows (under one row per
    device and gradient call) where they do not (NFT's 72, AWM's 96, Flow-GRPO's 288 on 64 devices, TempFlow-GRPO's 432). TempFlow-GRPO's
    published epoch is 32 seeds (8 GPUs x 4 sampling batches of one seed): on 64 devices it takes 16 prompts."""
    from flowjax.rl.method import build_method
    from flowjax.rl.batching import minibatch_layout, sample_micro_rows

    for module in CONFIGS.values():
        for variant in module.VARIANTS:
            c = module.get_config(variant)
            if variant == "tempflow" and devices > 32:
                assert c.train.prompts_per_batch * c.train.group_size == 32
                c.train.prompts_per_batch = devices // c.train.group_size
            batch = c.train.prompts_per_batch * c.train.group_size
            assert batch % devices == 0, (module.__name__, variant, devices)
            method = build_method(c)
            size, padded, calls = minibatch_layout(method.rows(batch), c.train.minibatches, devices)
            assert padded % devices == 0 and 0 <= padded - size < devices and calls == 1
            # the recipes' micro-batches (sized for a v5e chip by flowjax.plan) are valid on every mesh
            sample_micro_rows(batch, devices, c.sample.get("micro_batch", 0))
            micro, unit = c.train.get("micro_batch", 0), method.train_micro_unit()
            size, padded, calls = minibatch_layout(method.rows(batch), c.train.minibatches, devices, micro, unit)
            per_call = padded // (devices * calls)
            # calls of at most micro rows per device, whole units, padded by under one unit per device and call
            assert padded == per_call * calls * devices and per_call <= max(micro, per_call if calls == 1 else 0)
            assert per_call % unit == 0 or calls == 1
            assert 0 <= padded - size < devices * calls * unit, (module.__name__, variant, devices)
    assert minibatch_layout(72, 1, 32) == (72, 96, 1) and minibatch_layout(288, 1, 64, micro=2) == (288, 384, 3)
    # AWM's 96-row minibatch on 4 devices at micro 18: 24 rows per device in 2 calls of 12 (no padded calls of 18)
    assert minibatch_layout(96, 1, 4, micro=18) == (96, 96, 2)
    assert minibatch_layout(96, 1, 4, micro=18, unit=6) == (96, 96, 2)  # 12 rows = 2 groups of 6 per call
    assert minibatch_layout(100, 1, 4, micro=18, unit=6) == (100, 144, 2)  # 25 -> 2 calls of 3 groups


def test_default_variant_is_grpo():
    for module in CONFIGS.values():
        assert module.get_config("").variant == module.get_config().variant == "grpo"
    with pytest.raises(ValueError, match="unknown variant"):
        geneval.get_config("ppo")
    with pytest.raises(ValueError, match="unknown variant 'cps_fast' for ocr"):
        ocr.get_config("cps_fast")  # flow_grpo publishes the fast CFG-free recipe for GenEval and PickScore only


# ----------------------------------------------------------------------------- fake reward servers


class FakeServer:
    """A local HTTP reward server: `reply(body bytes) -> reply bytes`, on an ephemeral port."""

    def __init__(self, reply):
        self.requests = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.requests.append(body)
                out = reply(body)
                self.send_response(200)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def brightness(jpeg: bytes) -> float:
    return float(np.asarray(Image.open(io.BytesIO(jpeg)), np.float32).mean() / 255.0)


def geneval_reply(body: bytes) -> bytes:
    """The GenEval server's protocol (pickle in, pickle out): score = brightness, strict = score > 0.5."""
    req = pickle.loads(body)
    scores = [brightness(im) for im in req["images"]]
    strict = [float(s > 0.5) for s in scores]
    tags = [m["tag"] for m in req["meta_datas"]]
    group = {t: [s if tag == t else -10.0 for s, tag in zip(strict, tags)] for t in set(tags)}
    return pickle.dumps({"scores": scores, "rewards": strict, "strict_rewards": strict,
                         "group_rewards": group, "group_strict_rewards": group})


def ocr_reply(body: bytes) -> bytes:
    """A JSON OCR server: score = 1 - brightness; `chars` = the target's length (a per-sample metric)."""
    import base64

    req = json.loads(body)
    assert all("text" in m and "prompt" in m for m in req["metadata"])
    scores = [1.0 - brightness(base64.b64decode(im)) for im in req["images"]]
    return json.dumps({"scores": scores, "chars": [len(m["text"]) for m in req["metadata"]]}).encode()


@pytest.fixture(scope="module")
def servers():
    out = {"geneval": FakeServer(geneval_reply), "ocr": FakeServer(ocr_reply)}
    yield out
    for s in out.values():
        s.close()


# ----------------------------------------------------------------------------- tiny components


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random SD3 pipeline folder, prompt folders and a tiny PickScore-like CLIPModel folder."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("tiny")
    model = save_tiny_sd3(root / "sd3", seed=0)

    ocr_dir = root / "ocr"
    ocr_dir.mkdir()
    (ocr_dir / "train.txt").write_text('A sign that says "cat"\nA red mat with the word "dog"\n\nA photo of "blue"\n')
    (ocr_dir / "test.txt").write_text('A blurry photo that says "red"\n')
    plain = root / "plain"
    plain.mkdir()
    (plain / "train.txt").write_text("a photo of a cat\na red dog on a mat\nthe blue cat\n")
    (plain / "test.txt").write_text("an ugly blurry dog\n")

    clip = root / "pickscore"
    tok = transformers.CLIPTokenizer.from_pretrained(write_clip_vocab(root / "vocab"), model_max_length=16)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=8)
    torch.manual_seed(0)
    transformers.CLIPModel(cfg).eval().save_pretrained(clip, safe_serialization=True)
    tok.save_pretrained(clip)
    return {"model": model, "ocr": ocr_dir, "plain": plain, "pickscore": clip}


def single_device_mesh():
    return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def shrink(c, model, steps=2):
    """Tiny sizes: 16 px (latent 8 x 8 with the tiny VAE), `steps` sampling steps, 2 prompts x 2 images."""
    c.world.model = str(model)
    c.world.resolution = 16
    c.world.max_sequence_length = 8
    c.world.encode_batch_size = 4
    c.sample.latent_size = (8, 8)
    c.sample.num_steps = steps
    c.sample.eval_num_steps = 2
    c.sample.num_eval_prompts = 1
    c.train.prompts_per_batch, c.train.group_size = 2, 2
    c.train.minibatches, c.train.grad_accum = 1, 1
    c.train.steps = 1
    if c.method == "awm":
        c.awm.update(num_train_timesteps=1, rows_per_draw=0)
    c.lora.rank, c.lora.alpha = 2, 4.0
    c.dtype = c.param_dtype = "float32"
    c.eval_every = c.checkpoint_every = 1
    c.tensorboard = False
    c.grid_size = 2
    return c


def run_one_step(c, workdir):
    trainer = build(c, workdir, mesh=single_device_mesh())
    try:
        trainer.train()
    finally:
        trainer.close()
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert math.isfinite(rows[1]["reward/mean"]) and math.isfinite(rows[1]["eval/reward_mean"])
    assert math.isfinite(rows[1]["loss"]) and (Path(workdir) / "samples" / "step_000001.png").is_file()
    return trainer, rows


# ----------------------------------------------------------------------------- one step per config


def test_geneval_grpo_one_step(tiny, servers, tmp_path):
    """Flow-GRPO with CFG on generated GenEval prompts, the GenEval server's protocol, strict accuracy."""
    c = shrink(geneval.get_config("grpo"), tiny["model"])
    c.world.generate_train, c.world.generate_test = 6, 2
    c.reward.url = servers["geneval"].url
    n_before = len(servers["geneval"].requests)
    trainer, rows = run_one_step(c, tmp_path)
    world = trainer.world
    assert world.num_prompts == 6 and world.eval_world.num_prompts == 2 and world.channels == 4
    assert hasattr(world, "accuracy") and hasattr(world, "task_names")
    assert "accuracy" in world.score_names and "geneval_accuracy" in world.score_names
    for r in rows:
        assert 0.0 <= r["eval/accuracy"] <= 1.0 and any(k.startswith("eval/accuracy_") for k in r)
    # rollout + two evaluations (reward and accuracy share one server call each time)
    assert len(servers["geneval"].requests) - n_before == 3
    assert 0.0 <= rows[1]["reward/mean"] <= 1.0


def test_ocr_nft_one_step(tiny, servers, tmp_path):
    """DiffusionNFT on an OCR line folder, the JSON reward server, prompts encoded per batch."""
    c = shrink(ocr.get_config("nft"), tiny["model"])
    c.world.prompts = str(tiny["ocr"])
    c.world.precompute_limit = 1  # 3 training prompts: encoded per batch; the 1 test prompt up front
    c.reward.name, c.reward.url = "remote", servers["ocr"].url + "/score"  # the server option of configs/ocr.py
    c.reward.options = {"timeout": 120.0, "retries": 3, "batch_size": 64}
    c.reward.metrics = ("chars",)
    trainer, rows = run_one_step(c, tmp_path)
    world = trainer.world
    assert world._table_ctx is None and world.eval_world._table_ctx is not None
    assert not hasattr(world, "accuracy") and not hasattr(world, "task_names")
    assert world.captions([0]) == ['A sign that says "cat"']
    assert servers["ocr"].requests
    # per-batch and precomputed encodings agree
    ctx, pooled = world.encode(np.asarray([1, 0, 1]))
    ref_ctx, ref_pooled = world._encode_texts([world.prompts[1].prompt, world.prompts[0].prompt])
    np.testing.assert_allclose(np.asarray(ctx, np.float32)[:2], np.asarray(ref_ctx, np.float32), atol=1e-5)
    np.testing.assert_allclose(np.asarray(pooled, np.float32)[2], np.asarray(ref_pooled, np.float32)[0], atol=1e-5)


@pytest.mark.slow  # ~2 min on a busy 2-core CPU
def test_geneval_gdro_one_step(tiny, servers, tmp_path):
    """GDRO online: ODE rollouts with CFG, raw GenEval rewards ranked within each group."""
    c = shrink(geneval.get_config("gdro"), tiny["model"])
    c.world.generate_train, c.world.generate_test = 4, 1
    c.reward.url = servers["geneval"].url
    trainer, rows = run_one_step(c, tmp_path)
    assert rows[1]["nfe/rollout"] > 0 and math.isfinite(rows[1]["rank_loss"]) and rows[1]["fm_loss"] > 0


@pytest.mark.slow  # ~2 min on a busy 2-core CPU
def test_ocr_gdro_offline_one_step(tiny, servers, tmp_path):
    """GDRO offline: the dataset (one batch here) sampled by the base model and scored into WORKDIR/rollouts/,
    then one training step on it."""
    c = shrink(ocr.get_config("gdro_offline"), tiny["model"])
    c.world.prompts = str(tiny["ocr"])
    c.reward.name, c.reward.url = "remote", servers["ocr"].url + "/score"  # the server option of configs/ocr.py
    c.reward.options = {"timeout": 120.0, "retries": 3, "batch_size": 64}
    c.gdro.offline_batches = 1
    trainer, rows = run_one_step(c, tmp_path)
    assert rows[1]["nfe/rollout"] == 0 and rows[1]["nfe/dataset"] > 0 and rows[1]["images/sampled"] == 4
    assert (tmp_path / "rollouts" / "batch_000000.npz").is_file()


def test_pickscore_awm_one_step(tiny, tmp_path):
    """AWM with the jittable PickScore reward (a tiny random CLIPModel folder) on a plain line folder."""
    c = shrink(pickscore.get_config("awm"), tiny["model"], steps=3)  # AWM trains on steps [1, int(0.9 * n))
    c.world.prompts = str(tiny["plain"])
    c.reward.path = str(tiny["pickscore"])
    trainer, rows = run_one_step(c, tmp_path)
    world = trainer.world
    assert world.components[0].jittable and world.state["tokens"]["pickscore"].shape == (3, 16)
    # every prompt is in the precomputed tables: the text encoders left device memory
    assert world.encoders_released and world.pipe.text_encoder is None and world.pipe.text_encoder_3 is None
    # the world's reward equals the reward object's own scoring of the decoded images
    noise = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    ours = jax.jit(world.reward)(noise, jnp.asarray([2, 0]))
    images = world.images(noise)
    ref = world.reward_fn(images, [world.prompts[2].prompt, world.prompts[0].prompt])
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["geneval", "pickscore"])
def test_tempflow_one_step(name, tiny, servers, tmp_path):
    """TempFlow-GRPO (config/dgx.py *_sd3_pr): 2 prompts x 2 seeds, 6 branches at the one branch step of 2,
    every branch's final image scored (GenEval server / PickScore), one update, evaluation. --runslow: 75 s
    (geneval) and 127 s (pickscore) on 2 shared CPU cores."""
    c = shrink(CONFIGS[name].get_config("tempflow"), tiny["model"])
    if name == "geneval":
        c.world.generate_train, c.world.generate_test = 6, 2
        c.reward.url = servers["geneval"].url
        n_before = len(servers["geneval"].requests)
    else:
        c.world.prompts = str(tiny["plain"])
        c.reward.path = str(tiny["pickscore"])
    trainer, rows = run_one_step(c, tmp_path)
    assert trainer.method.rows(trainer.batch_size) == 4 * 6 * 1
    assert rows[1]["nfe/rollout"] == (1 + 6 * 1) * 2 * 4 and rows[1]["nfe/train"] == 24 * 2 * 2
    # one minibatch: on-policy. Exact on the linear model (test_tempflow.py); here the trunk's batch of 4 seeds and
    # the training chunk of 24 rows round the MMDiT's matmuls differently (measured |ratio - 1| <= 2.4e-7).
    assert abs(rows[1]["ratio_min"] - 1.0) < 1e-5 and abs(rows[1]["ratio_max"] - 1.0) < 1e-5
    if name == "geneval":  # the evaluation before the first update, the 24 branch images in one request, evaluation
        sizes = [len(pickle.loads(r)["images"]) for r in servers["geneval"].requests[n_before:]]
        assert sizes == [1, 24, 1]


@pytest.mark.slow
def test_pickscore_euphonium_one_step(tiny, tmp_path):
    """Euphonium on PickScore: the guide is PickScore's gradient at the decoded x0 prediction (through the VAE).
    --runslow: with the gradient through the tiny VAE decoder and CLIP it took 203 s on 2 busy CPU cores."""
    c = shrink(pickscore.get_config("euphonium"), tiny["model"], steps=3)
    c.euphonium.guide.start = 1  # the last 2 of 3 steps guided
    c.world.prompts = str(tiny["plain"])
    c.reward.path = str(tiny["pickscore"])
    trainer, rows = run_one_step(c, tmp_path)
    assert rows[1]["nfe/guide"] == 2 * 4 and math.isfinite(rows[1]["process_loss"])


def tiny_prm(path, model_folder):
    """A randomly initialised latent PRM that reads the tiny pipeline's latents and conditioning."""
    from flowjax.models import prm

    cfg = json.loads((Path(model_folder) / "transformer" / "config.json").read_text())
    prm.save(prm.initialise(prm.LatentPRMConfig(in_channels=cfg["in_channels"], text_dim=cfg["joint_attention_dim"],
                                                pooled_dim=cfg["pooled_projection_dim"], width=8, stages=2)), path)
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["geneval", "ocr"])
def test_euphonium_prm_one_step(tiny, servers, tmp_path, name):
    """Euphonium on GenEval / OCR (rewards without a gradient): the guide is a latent PRM (here a random one)."""
    c = shrink(CONFIGS[name].get_config("euphonium"), tiny["model"], steps=3)
    c.euphonium.guide.update(start=1, path=tiny_prm(tmp_path / "prm", tiny["model"]))
    if name == "geneval":
        c.world.generate_train, c.world.generate_test = 6, 2
        c.reward.url = servers["geneval"].url
    else:
        c.world.prompts = str(tiny["ocr"])
        c.reward.name, c.reward.url = "remote", servers["ocr"].url + "/score"
        c.reward.options = {"timeout": 120.0, "retries": 3, "batch_size": 64}
    trainer, rows = run_one_step(c, tmp_path / "run")
    assert rows[1]["nfe/guide"] == 2 * 4 and math.isfinite(rows[1]["process_loss"])


def test_euphonium_reward_guide_needs_a_gradient(tiny, servers, tmp_path):
    """A host reward (the GenEval server) cannot guide: the build says so and names the PRM."""
    c = shrink(geneval.get_config("euphonium"), tiny["model"], steps=3)
    c.euphonium.guide.update(source="reward", start=1)
    c.world.generate_train, c.world.generate_test = 4, 0
    c.reward.url = servers["geneval"].url
    with pytest.raises(ValueError, match="guide.source='prm'"):
        build(c, tmp_path, mesh=single_device_mesh())


# ----------------------------------------------------------------------------- FLUX.1


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    """A tiny random FLUX.1-dev pipeline folder (guidance embedding, dynamic shift)."""
    pytest.importorskip("diffusers")
    from tiny_flux import save_tiny_flux

    return save_tiny_flux(tmp_path_factory.mktemp("flux") / "flux", dev=True)


def shrink_flux(c, model, tiny, servers):
    """Tiny sizes for the FLUX recipes: 16 px (latent 8 x 8), a few steps, 2 prompts x 2 images, and the tiny
    PickScore model in place of PickScore / HPS-v2.1 (the HPS recipes' method runs unchanged)."""
    c.world.model, c.world.resolution, c.world.max_sequence_length = str(model), 16, 8
    c.world.encode_batch_size = 4
    c.sample.latent_size, c.sample.eval_num_steps, c.sample.num_eval_prompts = (8, 8), 2, 1
    c.sample.num_steps = {"grpo": 2, "dance": 3, "mixgrpo": 4}[c.variant]
    if c.variant == "mixgrpo":
        c.grpo.window.size = 2
    c.train.prompts_per_batch, c.train.group_size = 2, 2
    c.train.minibatches, c.train.grad_accum, c.train.steps = 1, 1, 1
    if c.lora.rank:
        c.lora.rank, c.lora.alpha = 2, 4.0
    c.dtype = c.param_dtype = "float32"
    c.eval_every = c.checkpoint_every = 1
    c.tensorboard, c.grid_size = False, 2
    if c.reward.name == "geneval_remote":
        c.reward.url = servers["geneval"].url
        c.world.generate_train, c.world.generate_test = 4, 1
    else:
        c.world.prompts, c.world.prompt_kind = str(tiny["plain"]), "plain"
        c.reward.name, c.reward.path = "pickscore", str(tiny["pickscore"])
    return c


@pytest.mark.parametrize("module, variant", [(flux_pickscore, v) for v in flux_pickscore.VARIANTS] +
                         [(flux_geneval, v) for v in flux_geneval.VARIANTS])
def test_flux_variants_one_step(module, variant, tiny, tiny_flux, servers, tmp_path):
    """One training step of each FLUX recipe on a tiny random FLUX.1-dev pipeline: the FLUX world (CLIP-L
    pooled + T5 conditioning, FLUX VAE, embedded guidance), the recipe's schedule and method."""
    c = shrink_flux(module.get_config(variant), tiny_flux, tiny, servers)
    trainer, rows = run_one_step(c, tmp_path)
    assert trainer.world.flux and trainer.world.model_guidance == 3.5
    if c.sample.shift == "dynamic":  # the pipeline's resolution-dependent schedule
        np.testing.assert_allclose(np.asarray(trainer.sigmas), np.asarray(trainer.world.pipe.sigmas(2, 16, 16)))
    assert math.isfinite(rows[-1]["reward/mean"]) and math.isfinite(rows[-1]["loss"])


def test_flux_sharded_run_matches_single_device(tiny, tiny_flux, servers, tmp_path):
    """Flow-GRPO on FLUX: 8 simulated devices (data 2 x fsdp 4) log what one device logs."""
    runs = {}
    for name, mesh in (("one", single_device_mesh()), ("eight", sharding.make_mesh({"data": 2, "fsdp": 4}))):
        c = shrink_flux(flux_pickscore.get_config("grpo"), tiny_flux, tiny, servers)
        c.train.group_size, c.train.steps, c.eval_every = 4, 2, 2
        trainer = build(c, tmp_path / name, mesh=mesh)
        trainer.train()
        trainer.close()
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(runs["one"], runs["eight"], strict=True):
        for key in ("reward/mean", "eval/reward_mean", "policy_loss", "grad_norm"):
            if key in a:
                np.testing.assert_allclose(b[key], a[key], rtol=2e-3, atol=1e-5, err_msg=key)


# ----------------------------------------------------------------------------- multi-reward world, errors


def test_multi_reward_components(tiny, servers):
    """A MultiReward of a jittable and a host reward: the weighted total and each component by name."""
    from flowjax import rewards
    from flowjax.data.prompts import load_prompt_folder
    from flowjax.worlds.sd3 import SD3World
    from flowjax.pipeline import SD3Pipeline

    pipe = SD3Pipeline.from_pretrained(tiny["model"], dtype=jnp.float32)
    reward = rewards.load("multi", weights={"pick": 2.0, "ocr": 0.5}, rewards={
        "pick": {"name": "pickscore", "path": str(tiny["pickscore"])},
        "ocr": {"name": "remote", "url": servers["ocr"].url, "timeout": 5.0}})
    world = SD3World(pipe, load_prompt_folder(tiny["ocr"], "train", "ocr"), reward, resolution=16,
                     max_sequence_length=8, metrics=("chars",))
    assert world.score_names == ("pick", "ocr", "ocr/chars")
    noise = jax.random.normal(jax.random.key(2), (3, 8, 8, 4))
    out = jax.jit(world.score)(noise, jnp.asarray([0, 1, 2]))
    np.testing.assert_allclose(out["reward"], 2.0 * out["pick"] + 0.5 * out["ocr"], rtol=1e-6)
    np.testing.assert_array_equal(out["ocr/chars"], [3, 3, 4])


def test_clear_errors(tiny, tmp_path):
    c = geneval.get_config()
    with pytest.raises(ValueError, match="--config.world.model=/path/to/stable-diffusion-3.5-medium"):
        build(c, tmp_path, mesh=single_device_mesh())
    c = shrink(geneval.get_config(), tiny["model"])
    c.world.generate_train, c.world.generate_test = 4, 0
    c.reward.name = "imagereward"
    with pytest.raises(ValueError, match="unknown reward 'imagereward'"):
        build(c, tmp_path, mesh=single_device_mesh())
    c = shrink(pickscore.get_config(), tiny["model"])
    c.world.prompts = str(tiny["plain"])
    with pytest.raises(ValueError, match="--config.reward.path="):
        build(c, tmp_path, mesh=single_device_mesh())
    c = shrink(ocr.get_config(), tiny["model"])
    with pytest.raises(ValueError, match="config.world.prompts"):
        build(c, tmp_path, mesh=single_device_mesh())
    c = shrink(ocr.get_config(), tiny["model"])
    c.world.prompts = str(tiny["ocr"])
    c.sample.latent_size = (16, 16)
    with pytest.raises(ValueError, match=r"sample.latent_size must be \(8, 8\)"):
        build(c, tmp_path, mesh=single_device_mesh())


@pytest.mark.slow
def test_command_line(tiny, servers, tmp_path):
    """The documented command line, with the model folder and the reward server given as flags."""
    flags = [f"--config.world.model={tiny['model']}", f"--config.reward.url={servers['geneval'].url}",
             "--config.world.resolution=16", "--config.sample.latent_size=(8, 8)",
             "--config.world.max_sequence_length=8", "--config.world.generate_train=4",
             "--config.world.generate_test=1", "--config.sample.num_steps=2", "--config.sample.eval_num_steps=2",
             "--config.sample.num_eval_prompts=1", "--config.train.prompts_per_batch=2",
             "--config.train.group_size=2", "--config.train.minibatches=1", "--config.train.grad_accum=1",
             "--config.train.steps=1", "--config.lora.rank=2", "--config.dtype=float32",
             "--config.param_dtype=float32", "--config.tensorboard=False", "--config.eval_every=1"]
    env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "flowjax.train", "--config=configs/geneval.py:grpo",
                           f"--workdir={tmp_path / 'run'}", *flags], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 1 and math.isfinite(rows[-1]["reward/mean"]) and "eval/accuracy" in rows[-1]
