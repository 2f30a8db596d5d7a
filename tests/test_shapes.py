"""The shapes world: captions, rendering, and the verifiable reward on true and corrupted images."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flowjax.data import shapes
from flowjax.worlds.shapes import ShapesWorld, images_to_pixels
from flowjax.models.clip import CLIPTextConfig, CLIPTextModel
from flowjax.rewards import shapes as reward

PROMPTS = shapes.all_prompts()
SPECS = shapes.specs_of(PROMPTS)
score = jax.jit(reward.score)


def by_task(task):
    idx = [i for i, p in enumerate(PROMPTS) if p.task == task]
    return SPECS[idx], [PROMPTS[i] for i in idx]


def test_captions_cover_every_task_with_checkable_meaning():
    tasks = {t: sum(p.task == t for p in PROMPTS) for t in shapes.TASKS}
    assert tasks == {"single": 18, "counting": 54, "two": 90, "position": 1080}
    assert PROMPTS[0].text == "a red square"
    assert len({p.text for p in PROMPTS}) == len(PROMPTS)
    pos = next(p for p in PROMPTS if p.task == "position")
    assert pos.text == "a red square left of a green square" and shapes.RELATIONS[pos.relation] == "left of"


def test_split_is_fixed_disjoint_and_holds_out_every_task():
    a, b = shapes.split_prompts(0.2, seed=0), shapes.split_prompts(0.2, seed=0)
    assert [p.text for p in a["heldout"]] == [p.text for p in b["heldout"]]
    assert not {p.text for p in a["train"]} & {p.text for p in a["heldout"]}
    for task in shapes.TASKS:
        n_train = sum(p.task == task for p in a["train"])
        n_held = sum(p.task == task for p in a["heldout"])
        assert n_held >= 1 and n_train >= 1
        assert abs(n_held / (n_train + n_held) - 0.2) < 0.05


def test_tokenizer_pads_ends_and_refuses_unknown_words():
    ids = shapes.tokenize(["two red circles", ""])
    assert ids.shape == (2, shapes.MAX_TOKENS)
    assert [shapes.VOCAB[i] for i in ids[0, :4]] == ["two", "red", "circles", "<eos>"]
    assert ids[1, 0] == shapes.TOKEN_IDS["<eos>"] and (ids[1, 1:] == 0).all()
    with pytest.raises(ValueError, match="purple"):
        shapes.tokenize(["a purple circle"])
    longest = max(len(p.text.split()) for p in PROMPTS)
    assert longest + 1 <= shapes.MAX_TOKENS


@pytest.mark.parametrize("seed", [0, 1])
def test_rendered_ground_truth_scores_one_for_every_caption(seed):
    images = shapes.render_batch(SPECS, np.random.default_rng(seed))
    out = score(images, SPECS)
    assert float(out["accuracy"].min()) == 1.0
    assert float(out["reward"].min()) == 1.0


def test_a_slightly_blurred_image_still_counts():
    # Generated images have soft edges; a 3x3 box blur at 30% must not change the verdict.
    specs, _ = by_task("two")
    images = shapes.render_batch(specs, np.random.default_rng(2))
    pad = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
    box = sum(pad[:, i:i + 36, j:j + 36] for i in range(3) for j in range(3)) / 9
    assert float(score(0.7 * images + 0.3 * box, specs)["accuracy"].mean()) == 1.0


def test_missing_object_gives_partial_credit_and_no_accuracy():
    specs, _ = by_task("counting")
    specs = specs[specs[:, 4] == 3]  # three of a kind
    rng = np.random.default_rng(3)
    fewer = specs.copy()
    fewer[:, 4] = 2
    images = shapes.render_batch(fewer, rng)  # two drawn, three asked
    out = score(images, specs)
    assert float(out["accuracy"].max()) == 0.0
    np.testing.assert_allclose(np.asarray(out["reward"]), 1 - 1 / 3, atol=1e-6)


def test_extra_object_and_wrong_colour_are_penalised():
    specs, _ = by_task("two")
    rng = np.random.default_rng(4)
    asked = specs.copy()
    asked[:, 5] = 0  # "a red square" asked; "a red square and a green circle" drawn
    out = score(shapes.render_batch(specs, rng), asked)
    assert float(out["accuracy"].max()) == 0.0
    np.testing.assert_allclose(np.asarray(out["reward"]), 1.0 - reward.Detector().extra_penalty, atol=1e-6)
    single, _ = by_task("single")
    two = single.copy()
    two[:, 4] = 2
    out = score(shapes.render_batch(two, rng), single)  # one asked, two of that kind drawn
    assert float(out["accuracy"].max()) == 0.0 and float(out["reward"].max()) == 0.0
    recoloured = single.copy()
    recoloured[:, 0] = (single[:, 0] + 1) % len(shapes.COLOUR_NAMES)
    out = score(shapes.render_batch(recoloured, rng), single)
    assert float(out["accuracy"].max()) == 0.0 and float(out["reward"].max()) == 0.0


def test_wrong_shape_is_not_counted():
    specs, _ = by_task("single")
    reshaped = specs.copy()
    reshaped[:, 2] = (specs[:, 2] + 1) % len(shapes.SHAPES)
    out = score(shapes.render_batch(reshaped, np.random.default_rng(5)), specs)
    assert float(out["accuracy"].max()) == 0.0


def test_mirrored_relation_fails_only_the_relation():
    specs, _ = by_task("position")
    specs = specs[np.isin(specs[:, 6], [1, 2])][:60]  # left of / right of
    images = shapes.render_batch(specs, np.random.default_rng(6))
    out = score(images[:, :, ::-1], specs)  # mirrored: the objects are right but on the wrong sides
    assert float(out["accuracy"].max()) == 0.0
    np.testing.assert_allclose(np.asarray(out["reward"]), 2 / 3, atol=1e-6)  # both groups found, relation not


def test_noise_and_blank_images_score_zero():
    specs = SPECS[:64]
    blank = np.zeros((64, 32, 32, 3), np.float32)
    noise = np.random.default_rng(7).uniform(0, 1, (64, 32, 32, 3)).astype(np.float32)
    for images in (blank, noise):
        out = score(images, specs)
        assert float(out["accuracy"].max()) == 0.0 and float(out["reward"].max()) == 0.0


def test_reward_is_per_sample():
    images = shapes.render_batch(SPECS[:8], np.random.default_rng(8))
    images[3] = 0  # one bad image must not change the others
    full = np.asarray(score(images, SPECS[:8])["reward"])
    single = [float(score(images[i:i + 1], SPECS[i:i + 1])["reward"][0]) for i in range(8)]
    np.testing.assert_array_equal(full, single)
    assert full[3] == 0 and (np.delete(full, 3) == 1).all()


def test_world_conditioning_and_reward_shapes():
    cfg = CLIPTextConfig(vocab_size=len(shapes.VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=shapes.MAX_TOKENS, projection_dim=8,
                         hidden_act="gelu", eos_token_id=shapes.TOKEN_IDS[shapes.EOS])
    split = shapes.split_prompts()
    world = ShapesWorld(CLIPTextModel(cfg, rngs=nnx.Rngs(0)), split["train"], eval_prompts=split["heldout"])
    assert world.num_prompts == len(split["train"]) and world.eval_world.num_prompts == len(split["heldout"])
    ctx, pooled = world.encode(jnp.asarray([0, 5]))
    assert ctx.shape == (2, shapes.MAX_TOKENS, 16) and pooled.shape == (2, 8)
    neg_ctx, neg_pooled = world.negative(3)
    assert neg_ctx.shape == (3, shapes.MAX_TOKENS, 16) and neg_pooled.shape == (3, 8)
    ids = jnp.arange(4)
    pixels = images_to_pixels(shapes.render_batch(np.asarray(world.specs[ids]), np.random.default_rng(0)))
    assert np.asarray(world.accuracy(pixels, ids)).tolist() == [1.0] * 4
    assert world.captions([0]) == [split["train"][0].text]
    assert set(world.eval_world.task_names(np.arange(world.eval_world.num_prompts))) == set(shapes.TASKS)
