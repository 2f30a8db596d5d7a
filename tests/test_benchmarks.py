"""The benchmarks run and compare like with like (on the tiny preset, CPU): benchmarks/pipeline.py's two pipelines
draw the same images, so its images/s measure the same work."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pipeline_benchmark_times_the_same_images_on_both_sides():
    bench = load_benchmark("pipeline")
    r = bench.run("sd3-tiny", dtype="float32", resolution=64, batch=2, steps=3, iters=1)
    assert r["flowjax"] > 0 and r["diffusers"] > 0
    assert r["max_abs_diff"] < 1e-4, r  # same weights, embeddings and noise: the same images (measured 8.5e-6)


def test_pipeline_benchmark_presets_are_the_published_shapes():
    from flowjax.models import presets

    bench = load_benchmark("pipeline")
    assert bench.CONFIGS["sd35-medium"] == (presets.SD35_MEDIUM, presets.SD3_VAE)
    x = bench.inputs("sd35-medium", 2, 512, 256)
    assert x["ctx"].shape == (2, 333, 4096) and x["pooled"].shape == (2, 2048) and x["noise"].shape == (2, 64, 64, 16)
