"""`flowjax.sampling.flux_sigmas` / `flux_mu` equal diffusers' FluxPipeline schedule bit for bit: the scheduler's
`.sigmas` after `set_timesteps(sigmas=np.linspace(1, 1/N, N), mu=calculate_shift(...))`, with the dynamic
(exponential or linear) shift and with the fixed shift of a non-dynamic scheduler; `sampling.sigmas` unchanged."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # noqa: E402

from flowjax import sampling  # noqa: E402

DEV = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
           max_image_seq_len=4096)  # FLUX.1-dev's scheduler_config.json
SCHNELL = dict(shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
               max_image_seq_len=4096)  # FLUX.1-schnell's


def reference(config, num_steps, image_seq_len):
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    mu = calculate_shift(image_seq_len, config["base_image_seq_len"], config["max_image_seq_len"],
                         config["base_shift"], config["max_shift"])
    scheduler.set_timesteps(num_steps, sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    return scheduler.sigmas.numpy(), mu


@pytest.mark.parametrize("num_steps", [1, 4, 28, 50])
@pytest.mark.parametrize("image_seq_len", [16, 256, 1024, 4096, 6144])  # 6144: past max_image_seq_len (1536x1024)
def test_dynamic_shift_equals_diffusers(num_steps, image_seq_len):
    want, mu = reference(DEV, num_steps, image_seq_len)
    ours_mu = sampling.flux_mu(image_seq_len, DEV["base_image_seq_len"], DEV["max_image_seq_len"],
                               DEV["base_shift"], DEV["max_shift"])
    assert ours_mu == mu
    got = np.asarray(sampling.flux_sigmas(num_steps, mu=ours_mu))
    assert got.dtype == np.float32 and got.shape == (num_steps + 1,)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("num_steps", [1, 4, 28])
def test_linear_time_shift_and_fixed_shift_equal_diffusers(num_steps):
    want, mu = reference({**DEV, "time_shift_type": "linear"}, num_steps, 1024)
    np.testing.assert_array_equal(np.asarray(sampling.flux_sigmas(num_steps, mu=mu, time_shift_type="linear")), want)
    want, _ = reference(SCHNELL, num_steps, 1024)  # mu is passed and ignored, as in FluxPipeline
    np.testing.assert_array_equal(np.asarray(sampling.flux_sigmas(num_steps, shift=1.0)), want)
    np.testing.assert_allclose(want[:-1], np.linspace(1.0, 1 / num_steps, num_steps), rtol=1e-7)
    want, _ = reference({**SCHNELL, "shift": 2.5}, num_steps, 1024)
    np.testing.assert_array_equal(np.asarray(sampling.flux_sigmas(num_steps, shift=2.5)), want)


def test_flux_mu_formula_and_defaults():
    # mu is linear in the token count: base_shift at base_seq_len, max_shift at max_seq_len (FluxPipeline defaults).
    assert math.isclose(sampling.flux_mu(256), 0.5) and math.isclose(sampling.flux_mu(4096), 1.15)
    assert math.isclose(sampling.flux_mu(2176), 0.825)
    assert sampling.flux_mu(1024) == calculate_shift(1024)


def test_sd3_schedule_is_unchanged():
    for shift in (1.0, 3.0):
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
        scheduler.set_timesteps(10)
        np.testing.assert_array_equal(np.asarray(sampling.sigmas(10, shift)), scheduler.sigmas.numpy())


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_steps"):
        sampling.flux_sigmas(0, mu=1.0)
    with pytest.raises(ValueError, match="time_shift_type"):
        sampling.flux_sigmas(4, mu=1.0, time_shift_type="cosine")
    with pytest.raises(ValueError, match="shift must be"):
        sampling.flux_sigmas(4, shift=0.0)
