"""python -m flowjax.pretrain --config=configs/shapes_pretrain.py --workdir=runs/shapes_base

Flow-matching pretraining of the shapes world's base model: a tiny CLIP text tower and a tiny MMDiT
(the same `flowjax.models` code as SD3.5) learn, jointly and from scratch, to draw the world's
captions. Rectified-flow objective as SD3: x_s = (1 - s) x0 + s eps, target eps - x0, s drawn
logit-normal; captions dropped with `caption_dropout` so classifier-free guidance works. An EMA of
the weights is what gets evaluated and saved.

Writes WORKDIR/metrics.jsonl (loss; held-out strict accuracy per task at every evaluation),
WORKDIR/samples/step_XXXXXX.png, WORKDIR/base/ (the base-model folder `flowjax.worlds.shapes.load_base`
reads; copy it to flowjax/assets/shapes_base to ship it).
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags
from tqdm.auto import tqdm

from flowjax import plots, sampling
from flowjax.data import shapes
from flowjax.worlds.shapes import images_to_pixels, load_base, pixels_to_images, save_base
from flowjax.models.clip import CLIPTextConfig, CLIPTextModel
from flowjax.models.mmdit import MMDiT, MMDiTConfig
from flowjax.models.prediction import check_prediction, to_velocity
from flowjax.rewards import shapes as shapes_reward
from flowjax.metrics import MetricsWriter

_CONFIG = config_flags.DEFINE_config_file("config", None, "e.g. configs/shapes_pretrain.py", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder")


class TextToImage(nnx.Module):
    """Text encoder + transformer trained as one module; `velocity(x, sigma, tokens)`."""

    def __init__(self, text_encoder: CLIPTextModel, transformer: MMDiT, prediction: str = "velocity"):
        self.text_encoder, self.transformer = text_encoder, transformer
        self.prediction = check_prediction(prediction)  # what the transformer's output means

    @classmethod
    def create(cls, text_config: CLIPTextConfig, model_config: MMDiTConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               prediction: str = "velocity") -> "TextToImage":
        """Randomly initialised, for pretraining."""
        return cls(CLIPTextModel(text_config, rngs=rngs), MMDiT(model_config, rngs=rngs, dtype=dtype), prediction)

    @classmethod
    def load(cls, path=None) -> "TextToImage":
        """A base-model folder (default: the shipped one) and its meta (shapes.json)."""
        text_encoder, transformer, meta = load_base(path)
        return cls(text_encoder, transformer, meta.get("prediction", "velocity")), meta

    def encode(self, tokens):
        out = self.text_encoder(tokens)
        return out.last_hidden_state, out.text_embeds

    def velocity(self, x, sigma, tokens):
        return self.velocity_from_embeddings(x, sigma, *self.encode(tokens))

    def velocity_from_embeddings(self, x, sigma, ctx, pooled):
        return to_velocity(self.transformer(x, sigma * 1000.0, ctx, pooled), x, sigma, self.prediction)


def flow_matching_loss(model: TextToImage, pixels, tokens, key, *, logit_mean=0.0, logit_std=1.0, shift=1.0):
    k_sigma, k_eps = jax.random.split(key)
    b = pixels.shape[0]
    sigma = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(k_sigma, (b,)))
    # SD3's resolution shift, applied to training sigmas too: objects span ~100 pixels here, so the
    # layout is decided at sigma > 0.9, which logit-normal(0, 1) alone almost never trains.
    sigma = sampling.time_shift(sigma, shift)
    eps = jax.random.normal(k_eps, pixels.shape)
    s = sigma[:, None, None, None]
    v = model.velocity((1 - s) * pixels + s * eps, sigma, tokens)
    return jnp.mean(jnp.square(v - (eps - pixels)))


def sample(model: TextToImage, tokens, empty_tokens, noise, *, num_steps, shift, guidance):
    """ODE samples in [-1, 1] with classifier-free guidance against the empty caption."""
    ctx, pooled = model.encode(tokens)
    neg_ctx, neg_pooled = model.encode(jnp.broadcast_to(empty_tokens, tokens.shape))

    def velocity(x, sigma):
        if guidance == 1.0:
            return model.velocity_from_embeddings(x, sigma, ctx, pooled)
        v = model.velocity_from_embeddings(jnp.concatenate([x, x]), jnp.concatenate([sigma, sigma]),
                                           jnp.concatenate([neg_ctx, ctx]), jnp.concatenate([neg_pooled, pooled]))
        v_u, v_c = jnp.split(v, 2)
        return v_u + guidance * (v_c - v_u)

    return sampling.rollout(velocity, noise, sampling.sigmas(num_steps, shift), kind="ode").latents[-1]


def evaluate(model, prompts, key, *, num_steps, shift, guidance, samples_per_prompt=1):
    """Held-out strict accuracy (overall and per task), the samples and their correctness."""
    prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    tokens = jnp.asarray(shapes.tokenize([p.text for p in prompts]))
    empty = jnp.asarray(shapes.tokenize([""]))[0]
    noise = jax.random.normal(key, (len(prompts), model.transformer.config.sample_size,
                                    model.transformer.config.sample_size, 3))
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda st, tok, n: sample(nnx.merge(graphdef, st), tok, empty, n, num_steps=num_steps,
                                             shift=shift, guidance=guidance))
    images = pixels_to_images(run(state, tokens, noise))
    scores = jax.jit(shapes_reward.score)(images, jnp.asarray(shapes.specs_of(prompts)))
    acc = np.asarray(scores["accuracy"])
    tasks = np.asarray([p.task for p in prompts])
    metrics = {"eval/accuracy": acc.mean(), "eval/reward_mean": float(np.mean(scores["reward"]))}
    metrics.update({f"eval/accuracy_{t}": acc[tasks == t].mean() for t in shapes.TASKS if (tasks == t).any()})
    return metrics, np.asarray(images), acc, [p.text for p in prompts]


def draw_captions(rng: np.random.Generator, by_task: list[np.ndarray], n: int, *, balance: bool) -> np.ndarray:
    """Indices of `n` captions, given the caption indices of each task (`by_task`, computed once): uniform
    over captions, or (balance) a uniform task, then a uniform caption of it. The world has 18
    single-object captions and 1080 position ones, so without balancing the model would rarely see a
    caption that asks for one object."""
    if not balance:
        return rng.integers(0, sum(len(g) for g in by_task), n)
    picked = rng.integers(0, len(by_task), n)
    return np.asarray([rng.choice(by_task[i]) for i in picked])


def pretrain(config, workdir) -> Path:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    c, t = config, config.train
    text_cfg = CLIPTextConfig(**c.text_encoder)
    model_cfg = MMDiTConfig(**c.model)
    if model_cfg.in_channels != 3 or model_cfg.sample_size != c.image_size:
        raise ValueError("the shapes model works on RGB pixels: model.in_channels must be 3 and model.sample_size "
                         f"must equal image_size={c.image_size}")
    model = TextToImage.create(text_cfg, model_cfg, rngs=nnx.Rngs(c.seed), prediction=c.prediction)
    graphdef, params = nnx.split(model)
    if not 0 <= t.warmup_steps < t.steps:
        raise ValueError(f"train.warmup_steps={t.warmup_steps} must be below train.steps={t.steps}")
    schedule = optax.warmup_cosine_decay_schedule(0.0, t.lr, t.warmup_steps, t.steps, end_value=t.lr * t.final_lr_fraction)
    optimizer = optax.chain(optax.clip_by_global_norm(t.max_grad_norm),
                            optax.adamw(schedule, weight_decay=t.weight_decay))
    opt_state = optimizer.init(params)
    ema = params

    @jax.jit
    def train_step(params, opt_state, ema, pixels, tokens, key, step):
        loss_fn = lambda p: flow_matching_loss(nnx.merge(graphdef, p), pixels, tokens, key,
                                               logit_mean=t.logit_mean, logit_std=t.logit_std, shift=t.shift)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        # EMA with warm-up, so that early evaluations do not average in the random initial weights.
        decay = jnp.minimum(t.ema_decay, (1.0 + step) / (10.0 + step))
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
        return params, opt_state, ema, loss

    prompts = shapes.all_prompts()  # the world's caption data; RL later trains on the train split only
    specs = shapes.specs_of(prompts)
    texts = np.asarray([p.text for p in prompts])
    tasks = np.asarray([p.task for p in prompts])
    by_task = [np.flatnonzero(tasks == name) for name in np.unique(tasks)]
    heldout = shapes.split_prompts(c.held_out_fraction, c.split_seed)["heldout"]
    rng = np.random.default_rng(c.seed)
    key = jax.random.key(c.seed)
    metrics = MetricsWriter(workdir / "metrics.jsonl", None, True, tensorboard=False)
    e = c.eval

    def run_eval(step):
        m, images, acc, captions = evaluate(nnx.merge(graphdef, ema), heldout, jax.random.key(1), num_steps=e.num_steps,
                                            shift=e.shift, guidance=e.guidance)
        plots.save_grid(images[: e.grid_size], captions[: e.grid_size], workdir / "samples" / f"step_{step:06d}.png",
                        correct=acc[: e.grid_size], title=f"pretraining step {step}: held-out accuracy {m['eval/accuracy']:.2f}")
        return m

    bar = tqdm(range(1, t.steps + 1), desc="pretraining", unit="step")
    losses, t0 = [], time.perf_counter()
    for step in bar:
        idx = draw_captions(rng, by_task, t.batch_size, balance=t.balance_tasks)
        captions = np.where(rng.random(t.batch_size) < t.caption_dropout, "", texts[idx])
        pixels = images_to_pixels(shapes.render_batch(specs[idx], rng, c.image_size))
        key, sub = jax.random.split(key)
        params, opt_state, ema, loss = train_step(params, opt_state, ema, pixels, shapes.tokenize(list(captions)), sub,
                                                  jnp.float32(step))
        losses.append(loss)
        if step % c.log_every == 0 or step == t.steps:
            row = {"loss": float(np.mean(jax.device_get(losses))), "time/elapsed_s": time.perf_counter() - t0}
            losses = []
            if step % e.every == 0 or step == t.steps:
                row.update(run_eval(step))
                bar.write(f"step {step}: " + ", ".join(f"{k}={v:.3f}" for k, v in row.items()))
            metrics.write(step, row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
    metrics.close()
    plots.plot_metrics(workdir / "metrics.jsonl", workdir / "pretrain_curves.png",
                       keys=("loss", "eval/accuracy", *(f"eval/accuracy_{k}" for k in shapes.TASKS)))
    final = nnx.merge(graphdef, ema)
    meta = dict(image_size=c.image_size, prediction=c.prediction, sample=dict(num_steps=e.num_steps, shift=e.shift, guidance=e.guidance),
                held_out_fraction=c.held_out_fraction, split_seed=c.split_seed,
                pretrain=dict(steps=t.steps, batch_size=t.batch_size, lr=t.lr, ema_decay=t.ema_decay, shift=t.shift, balance_tasks=t.balance_tasks,
                              seed=c.seed, wall_clock_s=round(time.perf_counter() - t0, 1)))
    return save_base(workdir / "base", final.text_encoder, final.transformer, meta)


def main(argv):
    del argv
    out = pretrain(_CONFIG.value, _WORKDIR.value)
    print(f"base model written to {out}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
