"""Two-way weight conversion: round trips, sharded/bf16 folders, mesh loading, clear errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from safetensors.torch import load_file  # noqa: E402

from flowjax import sharding  # noqa: E402
from flowjax.convert import CheckpointError, WeightsMismatchError, load_transformer, save_transformer  # noqa: E402
from flowjax.convert.safetensors_io import SafetensorsReader  # noqa: E402
from test_mmdit import CONFIGS, make_reference, random_inputs, reference_velocity, rel_err  # noqa: E402

CONFIG = CONFIGS["sd35_medium"][0]


def folder_tensors(folder):
    reader = SafetensorsReader(folder)
    return {k: reader[k] for k in reader.keys()}


def assert_same_tensors(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8)), f"{k} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ref")
    model = make_reference(CONFIG)
    model.save_pretrained(folder)
    return folder, model


def test_round_trip_is_bit_identical(reference, tmp_path):
    folder, _ = reference
    save_transformer(load_transformer(folder, dtype=jnp.float32), tmp_path / "out")
    assert_same_tensors(folder_tensors(folder), folder_tensors(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dual_attention_layers"] == [0, 1, 2]


def test_export_loads_in_diffusers(reference, tmp_path):
    folder, ref = reference
    save_transformer(load_transformer(folder, dtype=jnp.float32), tmp_path / "out", max_shard_bytes=20_000)
    assert (tmp_path / "out" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    back = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "out").eval()
    _, hw, text_len = CONFIGS["sd35_medium"]
    inputs = random_inputs(CONFIG, hw, text_len, batch=2)
    np.testing.assert_array_equal(reference_velocity(back, *inputs), reference_velocity(ref, *inputs))


def test_sharded_index_folder_loads(reference, tmp_path):
    folder, ref = reference
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    model = load_transformer(tmp_path / "sharded", dtype=jnp.float32)
    save_transformer(model, tmp_path / "out")
    assert_same_tensors(folder_tensors(folder), folder_tensors(tmp_path / "out"))


@pytest.mark.parametrize("torch_dtype", ["bfloat16", "float16"])
def test_half_precision_files(reference, tmp_path, torch_dtype):
    _, ref = reference
    half = make_reference(CONFIG).to(getattr(torch, torch_dtype))
    half.save_pretrained(tmp_path / "half")
    # Stored exactly in fp32, and the same bits again when exported in the file's dtype.
    model = load_transformer(tmp_path / "half", dtype=jnp.float32, param_dtype=jnp.float32)
    save_transformer(model, tmp_path / "out", dtype=getattr(jnp, torch_dtype))
    assert_same_tensors(folder_tensors(tmp_path / "half"), folder_tensors(tmp_path / "out"))
    # Params kept in bf16 on device also round-trip bit for bit.
    if torch_dtype == "bfloat16":
        model = load_transformer(tmp_path / "half", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
        assert model.proj_out.kernel[...].dtype == jnp.bfloat16
        save_transformer(model, tmp_path / "out16")
        assert_same_tensors(folder_tensors(tmp_path / "half"), folder_tensors(tmp_path / "out16"))


def test_mesh_loading_matches_unsharded(reference):
    assert jax.device_count() == 8, "conftest.py sets 8 simulated CPU devices"
    folder, _ = reference
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    sharded = load_transformer(folder, dtype=jnp.float32, mesh=mesh)
    plain = load_transformer(folder, dtype=jnp.float32)
    kernel = sharded.stacks[0].blocks.attn.to_q.kernel[...]  # [layers, embed, heads]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert kernel.addressable_shards[0].data.shape == (3, 24 // 4, 24)
    _, hw, text_len = CONFIGS["sd35_medium"]
    x, t, ctx, pooled = random_inputs(CONFIG, hw, text_len, batch=8)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    args = [jax.device_put(jnp.asarray(a), batch_sharding) for a in (x, t, ctx, pooled)]
    got = nnx.jit(lambda m, *a: m(*a))(sharded, *args)
    want = plain(*(jnp.asarray(a) for a in (x, t, ctx, pooled)))
    assert rel_err(np.asarray(got), np.asarray(want)) < 1e-5


def test_mesh_must_fit_devices():
    with pytest.raises(ValueError, match="needs 12 devices"):
        sharding.make_mesh({"data": 3, "fsdp": 4})


# --- errors a user will hit -------------------------------------------------------------------


def test_folder_without_config(reference, tmp_path):
    shutil.copy(reference[0] / "diffusion_pytorch_model.safetensors", tmp_path)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_transformer(tmp_path)


def test_not_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        load_transformer(tmp_path / "nowhere")


def test_folder_without_weights(reference, tmp_path):
    shutil.copy(reference[0] / "config.json", tmp_path)
    with pytest.raises(CheckpointError, match="no diffusion_pytorch_model.safetensors"):
        load_transformer(tmp_path)


def test_truncated_file(reference, tmp_path):
    shutil.copy(reference[0] / "config.json", tmp_path)
    data = (reference[0] / "diffusion_pytorch_model.safetensors").read_bytes()
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_transformer(tmp_path)


def _rewrite(reference, tmp_path, edit):
    shutil.copy(reference[0] / "config.json", tmp_path)
    tensors = load_file(reference[0] / "diffusion_pytorch_model.safetensors")
    edit(tensors)
    from safetensors.torch import save_file
    save_file(tensors, tmp_path / "diffusion_pytorch_model.safetensors")


def test_missing_and_unexpected_keys_are_listed(reference, tmp_path):
    def edit(t):
        t.pop("transformer_blocks.1.attn.to_k.weight")
        t.pop("proj_out.bias")
        t["transformer_blocks.9.extra.weight"] = torch.zeros(2)

    _rewrite(reference, tmp_path, edit)
    with pytest.raises(WeightsMismatchError) as e:
        load_transformer(tmp_path)
    msg = str(e.value)
    assert "2 missing keys" in msg and "transformer_blocks.1.attn.to_k.weight" in msg and "proj_out.bias" in msg
    assert "1 unexpected keys" in msg and "transformer_blocks.9.extra.weight" in msg


def test_wrong_shape_is_listed(reference, tmp_path):
    def edit(t):
        t["context_embedder.weight"] = torch.zeros(24, 21)

    _rewrite(reference, tmp_path, edit)
    with pytest.raises(WeightsMismatchError, match=r"context_embedder.weight: file has \[\(24, 21\)\]"):
        load_transformer(tmp_path)


def test_config_of_another_model(reference, tmp_path):
    shutil.copy(reference[0] / "diffusion_pytorch_model.safetensors", tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(CheckpointError, match="UNet2DConditionModel, not an SD3Transformer2DModel or FluxTrans"):
        load_transformer(tmp_path)


# --- command line -----------------------------------------------------------------------------


def test_cli_import_export_round_trip(reference, tmp_path, capsys):
    from flowjax.convert.__main__ import main

    folder, _ = reference
    assert main(["import-transformer", str(folder), str(tmp_path / "fj")]) == 0
    assert "5 blocks (3 dual-attention)" in capsys.readouterr().out
    assert main(["export-transformer", str(tmp_path / "fj"), str(tmp_path / "back")]) == 0
    assert_same_tensors(folder_tensors(folder), folder_tensors(tmp_path / "back"))
    assert main(["export-transformer", str(tmp_path / "fj"), str(tmp_path / "b16"), "--dtype", "bfloat16"]) == 0
    assert folder_tensors(tmp_path / "b16")["proj_out.weight"].dtype.name == "bfloat16"


def test_cli_errors_are_one_line(tmp_path, capsys):
    from flowjax.convert.__main__ import main

    assert main(["inspect", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["export-transformer", str(tmp_path), str(tmp_path / "x")]) == 2
    assert "not a flowjax model folder" in capsys.readouterr().err


def test_cli_help_explains_import_and_export():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "flowjax.convert", "--help"], capture_output=True, text=True, check=True).stdout
    assert "import-transformer" in out and "export-transformer" in out and "no torch" in out
