"""The OCR reward (flowjax.rewards.ocr) on the real PP-OCRv4 weights (the ONNX files of rapidocr-onnxruntime):

- the NNX detector's probability map and the recogniser's logits against ONNX Runtime on the same files,
  including the recogniser's width masks (a wide padded input computes the narrow network exactly);
- the converter uses or accounts for every constant of the graphs and names what does not match;
- Flow-GRPO's text rule (flow_grpo/ocr.py) in JAX against its plain-Python statement;
- the whole reward against rapidocr's own pipeline on rendered images (slow: 100+ images of 512 px, both
  presets, with the speed of both measured side by side);
- the SD3 world passes a jittable reward's metrics (the OCR accuracy) through; slow: one training step of
  configs/ocr.py with the reward on the tiny random SD3 pipeline.
"""

import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("cv2")
pytest.importorskip("pyclipper")
pytest.importorskip("rapidocr_onnxruntime")

from flowjax.convert import mapping  # noqa: E402
from flowjax.convert import ppocr as convert  # noqa: E402
from flowjax.rewards import ocr as ocr_reward  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ocr_reference  # noqa: E402
from ocr_reference import rapidocr_engine, rapidocr_read  # noqa: E402

REC_LOGITS = "p2o.Add.277"  # the recognition graph's value before its softmax


@pytest.fixture(scope="module")
def files():
    return convert.find_models()


@pytest.fixture(scope="module")
def models(files):
    return convert.load_detector(files[0]), convert.load_recognizer(files[1])


def session(path, extra_outputs=()):
    """An ONNX Runtime session of a file, with intermediate values added as outputs."""
    import onnx

    model = onnx.load(str(path))
    for name in extra_outputs:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def rel_err(ours, ref):
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


def text_crops(width: int, n: int = 2):
    """Normalised recogniser inputs [n, 48, width, 3] with rendered words."""
    words = ["Hello World", "Spring 2024", "OPEN"]
    out = [ocr_reference.sign(words[i % 3], 48, width, 30, xy=(4, 6)) for i in range(n)]
    return ((np.stack(out) / 255.0 - 0.5) / 0.5).astype(np.float32)


# ----------------------------------------------------------------------------- modules vs ONNX Runtime


@pytest.fixture(scope="module")
def small_reward():
    return ocr_reward.OCRReward(max_width=640, rec_widths=(640,), chunk=4, max_boxes=4)


@pytest.fixture(scope="module")
def reading(small_reward):
    """Five rendered 512 px images (the last without text) read by the reward: one compiled program."""
    data = ocr_reference.dataset(5, seed=3, blank_every=5)
    return data, read_all(small_reward, data, batch=5)


def test_detector_matches_onnxruntime(files, reading):
    """The reward's probability maps (preset paddleocr: 512 px, ImageNet normalisation) against ONNX Runtime."""
    data, ours = reading
    sess = session(files[0])
    mean, std = np.float32([0.485, 0.456, 0.406]), np.float32([0.229, 0.224, 0.225])
    for i in (0, 1):
        x = ((data[i][0].astype(np.float32) * np.float32(1 / 255) - mean) / std)[None]
        (prob,) = sess.run(None, {"x": x.transpose(0, 3, 1, 2)})
        assert prob.max() > 0.9 and ours["prob"][i].shape == (512, 512)  # there is text in it
        assert rel_err(ours["prob"][i], prob[0, 0]) < 1e-4


def test_recognizer_matches_onnxruntime_and_width_masks(files, models):
    """Logits of crops 160 and 200 px wide as ONNX Runtime computes them, both computed inside one 320-wide
    batch through the width masks (the reward's fixed-shape batches; what lies past a row's width is junk)."""
    sess = session(files[1], [REC_LOGITS])
    narrow = [text_crops(160, 1), text_crops(200, 2)[1:]]
    wide = np.full((2, 48, 320, 3), 7.0, np.float32)
    wide[0, :, :160], wide[1, :, :200] = narrow[0][0], narrow[1][0]
    ours = jax.jit(lambda m, x, v: m(x, v))(models[1], jnp.asarray(wide), jnp.asarray([160, 200]))
    for row, (x, width) in enumerate(zip(narrow, (160, 200))):
        probs, logits = sess.run(None, {"x": x.transpose(0, 3, 1, 2)})
        t = int(models[1].output_length(width))
        assert logits.shape == (1, t, 6625) and t == width // 8
        assert rel_err(ours[row:row + 1, :t], logits) < 1e-4
        assert rel_err(jax.nn.softmax(ours[row:row + 1, :t], -1), probs) < 1e-4


def test_converter_accounts_for_every_constant(files, tmp_path):
    import onnx

    for path in files:
        src = convert.OnnxConstants(path)
        names = set(src._arrays)
        assert set(src.keys()) | set(src.structural) == names and not set(src.keys()) & set(src.structural)
        assert all(src[n].size <= 16 for n in src.structural)
    # a weight missing from the file is named
    model = onnx.load(str(files[1]))
    node = next(n for n in model.graph.node if n.op_type == "Constant" and n.output[0] == "linear_85.b_0")
    model.graph.node.remove(node)
    broken = tmp_path / "rec.onnx"
    onnx.save(model, str(broken))
    with pytest.raises(mapping.WeightsMismatchError, match=r"linear_85\.<bias: absent>"):
        convert.load_recognizer(broken)
    # the detector's file is no recogniser
    with pytest.raises(mapping.WeightsMismatchError, match="does not match the PP-OCRv4 recogniser"):
        convert.load_recognizer(files[0])
    with pytest.raises(FileNotFoundError, match="ch_PP-OCRv4_det_infer.onnx"):
        convert.find_models(tmp_path / "nowhere")
    assert len(convert.read_characters(files[1])) == 6625


# ----------------------------------------------------------------------------- Flow-GRPO's text rule


def test_text_rule_matches_flow_grpo():
    """match_reward (JAX, fixed-length codes) equals flow_grpo/ocr.py's rule on varied pairs."""
    rng = np.random.default_rng(0)
    alphabet = "abcAB C12"
    pairs = [("Hello World", "hello world"), ("xxHelloWorldyy", "Hello World"), ("", "Open"), ("Opne", "Open"),
             ("completely different and much longer text", "cat"), ("ca", "cat"), ("CAT", "c a t"),
             ("İstanbul", "i̇stanbul"), ("a" * 70, "aaa b")]
    for _ in range(200):
        tgt = "".join(rng.choice(list(alphabet), rng.integers(1, 8))).strip() or "a"
        rec = "".join(rng.choice(list(alphabet), rng.integers(0, 14)))
        pairs.append((rec, tgt))
    N, L = 12, 80
    text = np.full((len(pairs), L), -2, np.int32)
    n_text = np.zeros(len(pairs), np.int32)
    tokens = np.full((len(pairs), 1 + N), -3, np.int32)
    for i, (rec, tgt) in enumerate(pairs):
        codes = [ord(c) for c in rec.replace(" ", "").lower()]
        text[i, :len(codes)], n_text[i] = codes, len(codes)
        t = tgt.replace(" ", "").lower()
        tokens[i, 0], tokens[i, 1:1 + len(t)] = len(t), [ord(c) for c in t]
    reward, accuracy = jax.jit(ocr_reward.match_reward)(text, n_text, tokens)
    want = np.array([ocr_reward.flow_grpo_reward(rec, tgt) for rec, tgt in pairs])
    np.testing.assert_allclose(reward, want, atol=1e-6)
    np.testing.assert_array_equal(accuracy, want == 1.0)
    assert ocr_reward.flow_grpo_reward("Opne", "Open") == 0.5 and ocr_reward.ocr_target('a "b c" d "e"') == "b c"
    with pytest.raises(ValueError, match="double quotes"):
        ocr_reward.ocr_target("no quotes here")
    with pytest.raises(ValueError, match="double quotes"):
        ocr_reward.ocr_target('empty "" target')


def test_detector_input_size_rule():
    """DetResizeForTest.resize_image_type0 (multiples of 32, at least 32) for both presets."""
    paddle, rapid = ocr_reward.PRESETS["paddleocr"], ocr_reward.PRESETS["rapidocr"]
    assert ocr_reward.det_size(512, 512, paddle) == (512, 512) and ocr_reward.det_size(16, 16, paddle) == (32, 32)
    assert ocr_reward.det_size(1000, 700, paddle) == (960, 672) and ocr_reward.det_size(500, 300, paddle) == (512, 288)
    assert ocr_reward.det_size(512, 512, rapid) == (736, 736) and ocr_reward.det_size(400, 1000, rapid) == (736, 1856)


# ----------------------------------------------------------------------------- the reward against rapidocr


def read_all(reward, data, batch: int = 8) -> dict:
    """The reward's reading of (image, prompt) pairs in batches: texts, rewards, accuracies, maps, seconds."""
    out = {"text": [], "reward": [], "accuracy": [], "prob": [], "seconds": 0.0}
    for i in range(0, len(data), batch):
        chunk = data[i:i + batch]
        images = np.stack([im for im, _ in chunk]).astype(np.float32) / 255.0
        start = time.perf_counter()
        got = reward.read(images, [p for _, p in chunk])
        out["seconds"] += time.perf_counter() - start
        for key in ("text", "reward", "accuracy", "prob"):
            out[key] += list(got[key])
    return out


def against_rapidocr(ours: dict, engine, data):
    """(agreement, mean |reward difference|, rapidocr seconds, differing pairs); checks the JAX reward rule
    on our own reading against the plain rule, and accuracy == (reward == 1)."""
    start = time.perf_counter()
    refs = [rapidocr_read(engine, im) for im, _ in data]
    t_ref = time.perf_counter() - start
    targets = [ocr_reward.ocr_target(p) for _, p in data]
    plain = [ocr_reward.flow_grpo_reward(o, t) for o, t in zip(ours["text"], targets)]
    np.testing.assert_allclose(ours["reward"], plain, atol=1e-6)
    np.testing.assert_array_equal(ours["accuracy"], np.asarray(ours["reward"]) == 1.0)
    ref_reward = np.array([ocr_reward.flow_grpo_reward(r, t) for r, t in zip(refs, targets)])
    agree = float(np.mean([o == r for o, r in zip(ours["text"], refs)]))
    diffs = [(o, r) for o, r in zip(ours["text"], refs) if o != r]
    return agree, float(np.abs(np.asarray(ours["reward"]) - ref_reward).mean()), t_ref, diffs


def test_reward_matches_rapidocr(small_reward, reading):
    data, ours = reading
    agree, diff, _, diffs = against_rapidocr(ours, rapidocr_engine("paddleocr"), data)
    assert agree == 1.0 and diff == 0.0, diffs
    assert ours["text"][-1] == "" and ours["reward"][-1] == 0.0  # the image without text
    assert min(len(t) for t in ours["text"][:-1]) > 0
    with pytest.raises(ValueError, match="max_target_chars=64"):
        small_reward.tokenize(['"' + "x" * 65 + '"'])


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["paddleocr", "rapidocr"])
def test_reward_matches_rapidocr_many(preset):
    """120 rendered 512 px images (12 without text): the recognised string equals rapidocr's on >= 95 % and
    the mean |reward - flow_grpo's reward of rapidocr's text| < 0.02; prints both speeds (images/s, CPU)."""
    reward = ocr_reward.OCRReward(preset=preset)
    data = ocr_reference.dataset(120, seed=11)
    read_all(reward, data[:8])  # compile outside the timing
    ours = read_all(reward, data)
    agree, diff, t_ref, diffs = against_rapidocr(ours, rapidocr_engine(preset), data)
    print(f"\n{preset}: agreement {agree:.3f}, mean |reward diff| {diff:.4f}, flowjax "
          f"{len(data) / ours['seconds']:.2f} images/s, rapidocr {len(data) / t_ref:.2f} images/s; "
          f"differing: {diffs[:5]}")
    assert agree >= 0.95 and diff < 0.02


# ----------------------------------------------------------------------------- the SD3 world


def test_world_component_returns_reward_metrics():
    """A jittable reward naming `metric_names` is called through `evaluate` and its metrics come back."""
    from flowjax.worlds.sd3 import _Component

    class Jittable:
        jittable, params = True, None

        def __init__(self, metric_names):
            self.metric_names = metric_names

        def tokenize(self, table):
            return np.asarray([[len(p["prompt"])] for p in table], np.int32)

        def score(self, params, images, tokens):
            return images.mean((1, 2, 3)) + tokens[:, 0]

        def evaluate(self, params, images, tokens):
            reward = self.score(params, images, tokens)
            return {"reward": reward, "accuracy": (reward > 3).astype(jnp.int32)}

    table = [{"prompt": "ab"}, {"prompt": "abcd"}]
    images, ids = jnp.full((3, 4, 4, 3), 0.5), jnp.asarray([1, 0, 1])
    with_metrics = _Component("x", Jittable(("accuracy",)), 1.0, table, (), None)
    out = jax.jit(lambda im, i, t: with_metrics(im, i, None, t))(images, ids, with_metrics.tokens)
    assert with_metrics.metrics == ("accuracy",) and out["accuracy"].dtype == jnp.float32
    np.testing.assert_allclose(out["reward"], [4.5, 2.5, 4.5])
    np.testing.assert_array_equal(out["accuracy"], [1.0, 0.0, 1.0])
    plain = _Component("x", Jittable(()), 1.0, table, (), None)
    assert plain.metrics == () and set(plain(images, ids, None, plain.tokens)) == {"reward"}


# ----------------------------------------------------------------------------- configs/ocr.py, one step


@pytest.mark.slow
def test_configs_ocr_one_step(tmp_path):
    """Flow-GRPO (configs/ocr.py's default) with the OCR reward inside the jitted step, tiny random SD3
    (slow: ~130 CPU-seconds, the trainer's programs plus the reward's, twice: rollout and evaluation)."""
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from configs import ocr
    from test_configs import run_one_step, shrink
    from tiny_sd3 import save_tiny_sd3

    model = save_tiny_sd3(tmp_path / "sd3", seed=0)
    prompts = tmp_path / "ocr"
    prompts.mkdir()
    (prompts / "train.txt").write_text('A sign that says "cat"\nA red mat with the word "dog"\n')
    (prompts / "test.txt").write_text('A blurry photo that says "red"\n')
    c = shrink(ocr.get_config(), model)
    assert c.reward.name == "ocr" and c.method == "grpo"
    c.world.prompts = str(prompts)
    c.reward.options.update(max_boxes=1, max_width=320, rec_widths=(320,), chunk=1)
    trainer, rows = run_one_step(c, tmp_path / "run")
    world = trainer.world
    assert world.components[0].jittable and world.score_names == ("accuracy",) and hasattr(world, "accuracy")
    assert world.state["tokens"]["ocr"].shape == (2, 65)
    for r in rows:
        assert 0.0 <= r["eval/accuracy"] <= 1.0
    assert 0.0 <= rows[1]["reward/accuracy"] <= 1.0 and math.isfinite(rows[1]["reward/mean"])
