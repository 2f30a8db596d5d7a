"""LoRA to and from diffusers: save_lora -> load_lora_weights parity, diffusers-written LoRAs in, merged
export vs fuse_lora, the export-lora / import-lora CLI, and the errors a user hits."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from flowjax import checkpoint  # noqa: E402
from flowjax.convert import CheckpointError, WeightsMismatchError, load_lora, load_transformer, save_lora  # noqa: E402
from flowjax.convert import save_transformer  # noqa: E402
from flowjax.convert.lora import adapter_spec  # noqa: E402
from flowjax.models import lora  # noqa: E402
from lora_training import train_adapters  # noqa: E402
from test_mmdit import CONFIGS, make_reference, random_inputs, reference_velocity, rel_err  # noqa: E402

CONFIG, HW, TEXT_LEN = CONFIGS["sd35_medium"]  # dual-attention stack, plain blocks, pre-only last block
REPO = Path(__file__).resolve().parents[1]


_forward = nnx.jit(lambda model, *args: model(*args))  # compiled once per adapter layout, not per call


def velocity(model, x, t, ctx, pooled):
    return np.asarray(_forward(model, *(jnp.asarray(a) for a in (x, t, ctx, pooled))))


def lora_values(model):
    return {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}


def sd3_pipeline(transformer):
    """A StableDiffusion3Pipeline holding only a transformer: enough for load_lora_weights / fuse_lora."""
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )


def file_tensors(path):
    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Base folder, inputs, and our model with rank-4 alpha-8 adapters after 3 Adam steps of flow matching."""
    base = tmp_path_factory.mktemp("base")
    make_reference(CONFIG).save_pretrained(base)
    model = load_transformer(base, dtype=jnp.float32)
    lora.apply(model, lora.LoRAConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
    g = np.random.default_rng(0)
    x0 = jnp.asarray(g.standard_normal((2, *HW, CONFIG["in_channels"])), jnp.float32)
    ctx = jnp.asarray(g.standard_normal((2, TEXT_LEN, CONFIG["joint_attention_dim"])), jnp.float32)
    pooled = jnp.asarray(g.standard_normal((2, CONFIG["pooled_projection_dim"])), jnp.float32)
    train_adapters(model, x0, ctx, pooled)
    b = model.stacks[1].blocks.attn.to_q.lora_b[...]
    assert float(jnp.abs(b).max()) > 1e-2  # the adapters moved away from their no-op init
    inputs = random_inputs(CONFIG, HW, TEXT_LEN, batch=2)
    return base, model, inputs, velocity(model, *inputs)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    return save_lora(trained[1], out)


def test_save_lora_loads_in_diffusers_pipeline(trained, exported):
    base, model, inputs, ours = trained
    assert exported.name == "pytorch_lora_weights.safetensors"
    tensors, meta = file_tensors(exported)
    assert tensors["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"].shape == (4, 24)  # [r, in]
    assert tensors["transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight"].shape == (24, 4)  # [out, r]
    assert "transformer.transformer_blocks.4.attn.to_add_out.lora_A.weight" not in tensors  # pre-only block
    assert len(tensors) == 2 * (8 * 4 + 7)
    config = json.loads(meta["lora_adapter_metadata"])
    assert config["transformer.r"] == 4 and config["transformer.lora_alpha"] == 8

    pipe = sd3_pipeline(make_reference(CONFIG))
    pipe.load_lora_weights(exported.parent)
    peft_config = pipe.transformer.peft_config["default_0"]
    assert (peft_config.r, peft_config.lora_alpha) == (4, 8)  # diffusers honours the metadata
    theirs = reference_velocity(pipe.transformer, *inputs)
    err = rel_err(ours, theirs)
    print(f"diffusers load_lora_weights vs flowjax with LoRA: rel err {err:.2e}")
    assert err < 1e-5
    assert rel_err(reference_velocity(make_reference(CONFIG), *inputs), theirs) > 1e-2  # the LoRA matters


def test_alpha_survives_only_through_metadata_or_folding(trained, exported, tmp_path):
    _, model, inputs, ours = trained
    tensors, _ = file_tensors(exported)
    # The same tensors without metadata: diffusers falls back to alpha = rank (scale 1, not 2).
    save_file(tensors, str(tmp_path / "bare.safetensors"), metadata={"format": "pt"})
    pipe = sd3_pipeline(make_reference(CONFIG))
    pipe.load_lora_weights(str(tmp_path / "bare.safetensors"))
    assert pipe.transformer.peft_config["default_0"].lora_alpha == 4
    assert rel_err(ours, reference_velocity(pipe.transformer, *inputs)) > 1e-3
    # fold_scale: B carries the scale, alpha = rank; correct even once the metadata is stripped.
    folded, _ = file_tensors(save_lora(model, tmp_path / "folded", fold_scale=True))
    save_file(folded, str(tmp_path / "folded_bare.safetensors"), metadata={"format": "pt"})
    pipe = sd3_pipeline(make_reference(CONFIG))
    pipe.load_lora_weights(str(tmp_path / "folded_bare.safetensors"))
    assert rel_err(ours, reference_velocity(pipe.transformer, *inputs)) < 1e-5


def test_round_trip_into_a_fresh_base_is_exact(trained, exported, tmp_path):
    base, model, inputs, ours = trained
    fresh = load_transformer(base, dtype=jnp.float32)
    adapted = load_lora(fresh, exported.parent)
    assert len(adapted) == 8 + 8 + 7 and adapted == sorted(adapter_spec(model))
    assert adapter_spec(fresh) == adapter_spec(model)
    want = lora_values(model)
    assert all(np.array_equal(v, want[k]) for k, v in lora_values(fresh).items())
    np.testing.assert_array_equal(velocity(fresh, *inputs), ours)
    # bf16 export: the same keys, half the bytes.
    bf16, _ = file_tensors(save_lora(model, tmp_path / "half.safetensors", dtype=jnp.bfloat16))
    assert all(v.dtype.name == "bfloat16" for v in bf16.values())


def test_lora_written_by_diffusers_loads_and_matches(trained, tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    base, _, inputs, _ = trained
    torch.manual_seed(5)
    ref = make_reference(CONFIG)
    targets = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn2.to_q",
               "ff.net.0.proj", "context_embedder", "proj_out"]
    # lora_alpha != r, one module kind at another rank and one at another alpha.
    config = LoraConfig(r=4, lora_alpha=6, target_modules=targets, rank_pattern={"attn.to_k": 2},
                        alpha_pattern={"proj_out": 3}, init_lora_weights="gaussian")
    ref.add_adapter(config)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    theirs = reference_velocity(ref, *inputs)
    metadata = ref.peft_config["default"].to_dict()
    diffusers.StableDiffusion3Pipeline.save_lora_weights(
        tmp_path / "d", transformer_lora_layers=get_peft_model_state_dict(ref), transformer_lora_adapter_metadata=metadata)

    model = load_transformer(base, dtype=jnp.float32)
    load_lora(model, tmp_path / "d")
    spec = adapter_spec(model)
    assert spec["stacks.1.blocks.attn.to_k"]["rank"] == 2 and spec["stacks.1.blocks.attn.to_q"]["scale"] == 1.5
    assert spec["stacks.0.blocks.attn.to_k"]["scale"] == 3.0 and spec["proj_out"]["scale"] == 0.75
    assert "stacks.0.blocks.ff.proj_in" in spec and "stacks.0.blocks.attn2.to_q" in spec
    err = rel_err(velocity(model, *inputs), theirs)
    print(f"diffusers-written LoRA (r=4, alpha=6, patterns) loaded into flowjax: rel err {err:.2e}")
    assert err < 1e-5

    # And back out: the per-module ranks and alphas travel as anchored rank_pattern / alpha_pattern.
    _, meta = file_tensors(save_lora(model, tmp_path / "back"))
    meta = json.loads(meta["lora_adapter_metadata"])
    assert meta["transformer.rank_pattern"] == {r"^transformer_blocks\.%d\.attn\.to_k" % i: 2 for i in range(5)}
    assert meta["transformer.alpha_pattern"] == {r"^proj_out": 3} and meta["transformer.lora_alpha"] == 6
    pipe = sd3_pipeline(make_reference(CONFIG))
    pipe.load_lora_weights(tmp_path / "back")
    assert rel_err(reference_velocity(pipe.transformer, *inputs), theirs) < 1e-5

    # The same adapter as PEFT saves it: `base_model.model.` keys + adapter_config.json.
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    state = {f"base_model.model.{k}": v.numpy() for k, v in get_peft_model_state_dict(ref).items()}
    save_file(state, str(peft_dir / "adapter_model.safetensors"))
    (peft_dir / "adapter_config.json").write_text(json.dumps({k: (list(v) if isinstance(v, set) else v)
                                                              for k, v in metadata.items()}, default=str))
    again = load_transformer(base, dtype=jnp.float32)
    load_lora(again, peft_dir)
    assert adapter_spec(again) == spec
    want = lora_values(model)
    assert all(np.array_equal(v, want[k]) for k, v in lora_values(again).items())


def test_merged_export_equals_diffusers_fuse_lora(trained, exported, tmp_path):
    _, model, inputs, ours = trained
    save_transformer(model, tmp_path / "merged")
    merged = reference_velocity(diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "merged").eval(), *inputs)
    pipe = sd3_pipeline(make_reference(CONFIG))
    pipe.load_lora_weights(exported.parent)
    pipe.fuse_lora(components=["transformer"])
    pipe.unload_lora_weights()  # keeps the fused weights
    fused = reference_velocity(pipe.transformer, *inputs)
    err = rel_err(merged, fused)
    print(f"save_transformer (merged) vs diffusers fuse_lora: rel err {err:.2e}; vs flowjax {rel_err(merged, ours):.2e}")
    assert err < 1e-5 and rel_err(merged, ours) < 1e-5


def test_cli_export_and_import_lora(trained, exported, tmp_path, capsys):
    from flowjax.convert.__main__ import main

    base, model, inputs, ours = trained
    checkpoint.save_model(model, tmp_path / "trained")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

    def cli(*args):
        run = subprocess.run([sys.executable, "-m", "flowjax.convert", *map(str, args)], cwd=REPO, env=env,
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return run.stdout

    assert "23 adapted projections, (rank, alpha) [(4, 8.0)]" in cli("export-lora", tmp_path / "trained", tmp_path / "out")
    got, meta = file_tensors(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    want, want_meta = file_tensors(exported)
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
    assert meta == want_meta
    # Base as a diffusers folder (subprocess) and as a flowjax model folder (in process).
    cli("import-lora", base, tmp_path / "out", tmp_path / "fj_lora")
    assert main(["import-transformer", str(base), str(tmp_path / "fj_base")]) == 0
    assert main(["import-lora", str(tmp_path / "fj_base"), str(exported), str(tmp_path / "fj_lora2")]) == 0
    assert "23 adapted projections" in capsys.readouterr().out
    for folder in ("fj_lora", "fj_lora2"):
        back = checkpoint.load_model(tmp_path / folder, dtype=jnp.float32)
        assert adapter_spec(back) == adapter_spec(model)
        np.testing.assert_array_equal(velocity(back, *inputs), ours)
    # export-transformer merges the adapters.
    assert main(["export-transformer", str(tmp_path / "trained"), str(tmp_path / "merged")]) == 0
    merged = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "merged").eval()
    assert rel_err(reference_velocity(merged, *inputs), ours) < 1e-5


# --- errors a user will hit -------------------------------------------------------------------


def _write(path, tensors, metadata=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _pair(module, r=2, d_in=24, d_out=24):
    return {f"transformer.{module}.lora_A.weight": np.ones((r, d_in)), f"transformer.{module}.lora_B.weight": np.ones((d_out, r))}


@pytest.fixture
def base_model(trained):
    return load_transformer(trained[0], dtype=jnp.float32)


def test_save_without_lora_is_refused(base_model, tmp_path, capsys):
    from flowjax.convert.__main__ import main

    with pytest.raises(CheckpointError, match="no LoRA adapters"):
        save_lora(base_model, tmp_path)
    checkpoint.save_model(base_model, tmp_path / "plain")
    assert main(["export-lora", str(tmp_path / "plain"), str(tmp_path / "x")]) == 2
    assert "no LoRA adapters" in capsys.readouterr().err


def test_unknown_modules_are_listed(base_model, tmp_path):
    f = _write(tmp_path / "a.safetensors", {**_pair("transformer_blocks.0.attn.to_q"),
                                            **_pair("transformer_blocks.7.attn.to_q"),
                                            **_pair("single_transformer_blocks.0.attn.to_q")})
    with pytest.raises(WeightsMismatchError) as e:
        load_lora(base_model, f)
    msg = str(e.value)
    assert "2 modules the model does not have" in msg
    assert "transformer_blocks.7.attn.to_q" in msg and "single_transformer_blocks.0.attn.to_q" in msg
    assert adapter_spec(base_model) == {}  # nothing attached on failure


def test_text_encoder_lora_is_refused(base_model, tmp_path):
    tensors = {**_pair("transformer_blocks.0.attn.to_q"),
               "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": np.ones((2, 8)),
               "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": np.ones((8, 2))}
    with pytest.raises(CheckpointError, match="text-encoder LoRA weights, which flowjax does not support"):
        load_lora(base_model, _write(tmp_path / "t.safetensors", tensors))


def test_shape_and_mixed_rank_problems_are_listed(base_model, tmp_path):
    tensors = {**_pair("transformer_blocks.0.attn.to_q", d_in=20),  # wrong width
               **_pair("transformer_blocks.0.attn.to_k", r=2), **_pair("transformer_blocks.1.attn.to_k", r=3)}
    with pytest.raises(WeightsMismatchError) as e:
        load_lora(base_model, _write(tmp_path / "s.safetensors", tensors))
    msg = str(e.value)
    assert "transformer_blocks.0.attn.to_q: lora_A [2, 20], lora_B [24, 2]; this model needs [r, 24]" in msg
    assert "stacks.0.blocks.attn.to_k" in msg and "ranks [2, 3]" in msg
    assert adapter_spec(base_model) == {}


def test_partial_stack_and_no_metadata(base_model, tmp_path):
    # Only layer 1 of the dual stack: layers 0 and 2 get exact no-op adapters (B = 0); no metadata -> alpha = rank.
    load_lora(base_model, _write(tmp_path / "p.safetensors", _pair("transformer_blocks.1.attn.to_v")))
    dense = base_model.stacks[0].blocks.attn.to_v
    assert dense.lora_scale == 1.0 and dense.lora_a.shape == (3, 24, 2)
    b = np.asarray(dense.lora_b[...])
    assert not b[0].any() and not b[2].any() and b[1].all()


def test_unreadable_inputs(base_model, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_lora(base_model, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no pytorch_lora_weights.safetensors"):
        load_lora(base_model, tmp_path / "empty")
    kohya = {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": np.ones((2, 24)),
             "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": np.ones((72, 2))}
    with pytest.raises(CheckpointError, match="kohya"):
        load_lora(base_model, _write(tmp_path / "k.safetensors", kohya))
    half = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": np.ones((2, 24))}
    with pytest.raises(CheckpointError, match="lora_B missing"):
        load_lora(base_model, _write(tmp_path / "h.safetensors", half))


def test_file_with_several_named_adapters(base_model, tmp_path):
    named = {k.replace(".lora_A.", f".lora_A.{n}.").replace(".lora_B.", f".lora_B.{n}."): v * i
             for i, n in enumerate(("style", "other"), 1) for k, v in _pair("transformer_blocks.0.attn.to_q").items()}
    f = _write(tmp_path / "n.safetensors", named)
    with pytest.raises(CheckpointError, match=r"several adapters \['other', 'style'\]"):
        load_lora(base_model, f)
    assert load_lora(base_model, f, adapter_name="other") == ["stacks.0.blocks.attn.to_q"]
    assert float(base_model.stacks[0].blocks.attn.to_q.lora_b[...][0].max()) == 2.0
