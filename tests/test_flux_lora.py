"""FLUX.1 LoRA: adapters on the attention projections of both block kinds (random B, or trained a few steps in
flowjax with --runslow), exported with `save_lora` / `export-lora` and loaded by diffusers'
`FluxPipeline.load_lora_weights`: the same velocity; the file read back by `load_lora`; the merged export equals
diffusers' `fuse_lora`."""

import json

import jax

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
from safetensors import safe_open  # noqa: E402

from flowjax import checkpoint  # noqa: E402
from flowjax.convert import load_lora, load_transformer, save_lora, save_transformer  # noqa: E402
from flowjax.convert.lora import adapter_spec  # noqa: E402
from flowjax.models import lora  # noqa: E402
from lora_training import train_adapters  # noqa: E402
from test_flux import CONFIGS, make_reference, ours_velocity, random_inputs, reference_velocity, rel_err  # noqa: E402

CONFIG, HW, TEXT_LEN = CONFIGS["dev"]  # 2 double-stream + 3 single-stream blocks, guidance embedding


def flux_pipeline(transformer):
    """A FluxPipeline holding only a transformer: enough for load_lora_weights / fuse_lora."""
    return diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                                  tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)


def adapted_model(base):
    """Our model of `base` with rank-4 alpha-8 adapters on FLUX_ATTENTION_TARGETS (B still zero)."""
    model = load_transformer(base, dtype=jnp.float32)
    adapted = lora.apply(model, lora.LoRAConfig(rank=4, alpha=8.0, targets=lora.FLUX_ATTENTION_TARGETS),
                         rngs=nnx.Rngs(1))
    assert sorted(adapted) == sorted(
        [f"double_blocks.blocks.attn.{p}" for p in ("to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj",
                                                    "add_v_proj", "to_add_out")]
        + [f"single_blocks.blocks.attn.{p}" for p in ("to_q", "to_k", "to_v")])
    return model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    make_reference(CONFIG).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def perturbed(base):
    """Base folder, inputs, and our model whose adapters' B matrices are random (every adapter matters)."""
    model = adapted_model(base)
    for i, (_, dense) in enumerate(lora.dense_modules(model)):
        if dense.lora_b is not None:
            b = dense.lora_b[...]
            dense.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(i), b.shape, b.dtype)
    inputs = random_inputs(CONFIG, HW, TEXT_LEN, batch=2)
    return base, model, inputs, ours_velocity(model, *inputs)


@pytest.fixture(scope="module")
def trained(base):
    """Base folder, inputs, and our model with adapters after 3 Adam steps of flow matching."""
    model = adapted_model(base)
    x0, _, ctx, pooled, guidance = (jnp.asarray(a) for a in random_inputs(CONFIG, HW, TEXT_LEN, batch=2, seed=5))
    train_adapters(model, x0, ctx, pooled, guidance)
    for stack in (model.double_blocks, model.single_blocks):
        assert float(jnp.abs(stack.blocks.attn.to_q.lora_b[...]).max()) > 1e-2  # moved away from the no-op init
    inputs = random_inputs(CONFIG, HW, TEXT_LEN, batch=2)
    return base, model, inputs, ours_velocity(model, *inputs)


# Random B by default; the trained adapters (a jitted gradient through both scanned stacks) with --runslow.
@pytest.mark.parametrize("adapters", ["perturbed", pytest.param("trained", marks=pytest.mark.slow)])
def test_exported_lora_loads_in_diffusers_flux_pipeline(adapters, request, tmp_path):
    base, model, inputs, ours = request.getfixturevalue(adapters)
    exported = save_lora(model, tmp_path / "lora")
    with safe_open(str(exported), framework="numpy") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert "transformer.single_transformer_blocks.2.attn.to_v.lora_A.weight" in keys
    assert "transformer.transformer_blocks.1.attn.to_add_out.lora_B.weight" in keys
    assert len(keys) == 2 * (8 * 2 + 3 * 3)  # 8 projections x 2 double blocks, 3 x 3 single blocks; A and B
    config = json.loads(meta["lora_adapter_metadata"])
    assert config["transformer.r"] == 4 and config["transformer.lora_alpha"] == 8

    pipe = flux_pipeline(make_reference(CONFIG))
    pipe.load_lora_weights(exported.parent)
    peft_config = pipe.transformer.peft_config["default_0"]
    assert (peft_config.r, peft_config.lora_alpha) == (4, 8)  # diffusers honours the metadata
    theirs = reference_velocity(pipe.transformer, *inputs)
    base_velocity = reference_velocity(make_reference(CONFIG), *inputs)
    err = rel_err(ours, theirs)
    print(f"{adapters}: diffusers FluxPipeline.load_lora_weights vs flowjax with LoRA: rel err {err:.2e} "
          f"(the adapters move the velocity by {rel_err(ours, base_velocity):.2e})")
    assert rel_err(ours, base_velocity) > 1e-2  # the adapters matter
    assert err < 1e-5

    # Read back by flowjax: the same adapters on a fresh base.
    fresh = load_transformer(base, dtype=jnp.float32)
    load_lora(fresh, exported)
    assert adapter_spec(fresh) == adapter_spec(model)
    np.testing.assert_allclose(ours_velocity(fresh, *inputs), ours, rtol=0, atol=1e-6)

    # Merged export == diffusers' fuse_lora.
    pipe.fuse_lora()
    save_transformer(model, tmp_path / "merged")
    merged = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "merged").eval()
    assert rel_err(reference_velocity(merged, *inputs), reference_velocity(pipe.transformer, *inputs)) < 1e-5


def test_cli_export_lora_of_a_flux_model(perturbed, tmp_path, capsys):
    """A FLUX model folder (flowjax.checkpoint) with adapters -> `export-lora` writes what save_lora writes."""
    from flowjax.convert.__main__ import main

    _, model, inputs, ours = perturbed
    checkpoint.save_model(model, tmp_path / "trained")
    back = checkpoint.load_model(tmp_path / "trained", dtype=jnp.float32)
    np.testing.assert_array_equal(ours_velocity(back, *inputs), ours)
    assert main(["export-lora", str(tmp_path / "trained"), str(tmp_path / "out")]) == 0
    assert "11 adapted projections, (rank, alpha) [(4, 8.0)]" in capsys.readouterr().out
    want = save_lora(model, tmp_path / "want")
    with safe_open(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"), framework="numpy") as f, \
            safe_open(str(want), framework="numpy") as g:
        assert sorted(f.keys()) == sorted(g.keys()) and f.metadata() == g.metadata()
        assert all(np.array_equal(f.get_tensor(k), g.get_tensor(k)) for k in g.keys())
