"""LoRA: PEFT scale, exact no-op at init, merge/unmerge, LoRA-off reference, merged export to diffusers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flowjax.models import lora
from flowjax.models.mmdit import MMDiT, MMDiTConfig

CFG = MMDiTConfig(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                  num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                  pooled_projection_dim=10, out_channels=4, pos_embed_max_size=8,
                  dual_attention_layers=(0,), qk_norm="rms_norm")


def inputs(batch=2, seed=0):
    g = np.random.default_rng(seed)
    return (jnp.asarray(g.standard_normal((batch, 8, 8, 4)), jnp.float32), jnp.asarray([300.0, 800.0][:batch]),
            jnp.asarray(g.standard_normal((batch, 5, 12)), jnp.float32), jnp.asarray(g.standard_normal((batch, 10)), jnp.float32))


def randomise_b(model, seed=1):
    state = nnx.state(model, nnx.LoRAParam)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(state))))
    nnx.update(model, jax.tree.map(lambda x: 0.05 * jax.random.normal(next(keys), x.shape), state))


def tiny(rank=4, alpha=8.0, targets=lora.SD3_ATTENTION_TARGETS):
    model = MMDiT(CFG, rngs=nnx.Rngs(0), dtype=jnp.float32)
    base = model(*inputs())
    adapted = lora.apply(model, lora.LoRAConfig(rank=rank, alpha=alpha, targets=targets), rngs=nnx.Rngs(1))
    return model, base, adapted


def test_adapters_start_as_identity_and_cover_the_targets():
    model, base, adapted = tiny()
    # 3 stacks (dual, plain, last) x joint attention projections; the last block has no to_add_out.
    assert len(adapted) == 8 + 8 + 7
    assert not any("attn2" in p for p in adapted)
    np.testing.assert_array_equal(np.asarray(model(*inputs())), np.asarray(base))
    a = model.stacks[0].blocks.attn.to_q.lora_a
    assert a.shape == (1, 16, 4) and model.stacks[0].blocks.attn.to_q.lora_scale == 2.0


def test_only_adapters_are_trainable():
    model, _, _ = tiny()
    trainable = nnx.state(model, nnx.LoRAParam)
    frozen = nnx.state(model, lora.BASE)
    n_lora = sum(x.size for x in jax.tree.leaves(trainable))
    assert n_lora == lora.count(model) > 0
    assert not set(map(tuple, dict(nnx.to_flat_state(trainable)))) & set(dict(nnx.to_flat_state(frozen)))


def test_forward_is_base_plus_scaled_low_rank_update():
    model, _, _ = tiny()
    randomise_b(model)
    dense = model.stacks[1].blocks.attn.to_v
    x = jnp.ones((3, 16))
    # A single layer of the stack, computed by hand: x W + b + (alpha/r) x A B.
    w, b = dense.kernel[...][0], dense.bias[...][0]
    a, bb = dense.lora_a[...][0], dense.lora_b[...][0]
    want = x @ w + b + 2.0 * (x @ a) @ bb
    layer = nnx.merge(*nnx.split(dense, lambda path, v: True))  # copy
    got = jax.vmap(lambda k, bi, la, lb: x @ k + bi + dense.lora_scale * (x @ la) @ lb)(
        layer.kernel[...], layer.bias[...], layer.lora_a[...], layer.lora_b[...])[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


def test_merge_unmerge_and_reference():
    model, base, _ = tiny()
    randomise_b(model)
    adapted_out = np.asarray(model(*inputs()))
    assert np.abs(adapted_out - np.asarray(base)).max() > 1e-3
    # The reference policy: same base, adapters zeroed -> exactly the base model.
    graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
    ref = nnx.merge(graphdef, lora.disabled(adapters), rest)
    np.testing.assert_array_equal(np.asarray(ref(*inputs())), np.asarray(base))
    lora.merge(model)
    np.testing.assert_allclose(np.asarray(model(*inputs())), adapted_out, rtol=1e-5, atol=1e-5)
    lora.unmerge(model)
    np.testing.assert_allclose(np.asarray(model(*inputs())), adapted_out, rtol=1e-5, atol=1e-5)


def test_bad_targets_are_refused():
    model = MMDiT(CFG, rngs=nnx.Rngs(0), dtype=jnp.float32)
    with pytest.raises(ValueError, match="match no projection"):
        lora.apply(model, lora.LoRAConfig(rank=2, alpha=2, targets=("attn.to_qq",)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank"):
        lora.apply(model, lora.LoRAConfig(rank=0, alpha=2), rngs=nnx.Rngs(0))


def test_merged_export_loads_in_diffusers(tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from flowjax.convert import save_transformer

    model, _, _ = tiny()
    randomise_b(model)
    save_transformer(model, tmp_path)
    ref = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path).eval()
    x, t, ctx, pooled = (np.asarray(a) for a in inputs())
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(ctx), torch.from_numpy(pooled),
                   torch.from_numpy(t)).sample.numpy().transpose(0, 2, 3, 1)
    got = np.asarray(model(*inputs()))
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5
