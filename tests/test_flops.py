"""flowjax.flops: matmul / convolution FLOPs from the jaxpr, loops multiplied out (closed forms)."""

import jax
import jax.numpy as jnp
import numpy as np

from flowjax import flops


def test_matmul_batched_matmul_and_scan_are_counted_in_closed_form():
    a = jax.ShapeDtypeStruct((8, 16), jnp.float32)
    b = jax.ShapeDtypeStruct((16, 32), jnp.float32)
    assert flops.count(jnp.matmul, a, b).flops == 2 * 8 * 16 * 32
    x = jax.ShapeDtypeStruct((4, 8, 16), jnp.float32)
    y = jax.ShapeDtypeStruct((4, 16, 32), jnp.float32)
    assert flops.count(lambda p, q: jnp.einsum("bij,bjk->bik", p, q), x, y).flops == 4 * 2 * 8 * 16 * 32

    def scanned(w, h):  # 10 steps of h @ w, under jit and remat as the samplers and the scanned blocks are
        step = jax.checkpoint(lambda c, _: (jnp.tanh(c @ w), None))
        return jax.jit(lambda h: jax.lax.scan(step, h, None, length=10)[0])(h)

    w = jax.ShapeDtypeStruct((32, 32), jnp.float32)
    h = jax.ShapeDtypeStruct((8, 32), jnp.float32)
    assert flops.count(scanned, w, h).flops == 10 * 2 * 8 * 32 * 32
    # reverse mode under remat: the forward product, its recomputation and the two products of its transpose
    grad = jax.grad(lambda w, h: scanned(w, h).sum())
    assert flops.count(grad, w, h).flops == 4 * 10 * 2 * 8 * 32 * 32


def test_convolution_counts_every_output_and_kernel_element():
    x = jax.ShapeDtypeStruct((2, 3, 16, 16), jnp.float32)  # NCHW
    k = jax.ShapeDtypeStruct((8, 3, 3, 3), jnp.float32)  # OIHW
    conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME")
    assert flops.count(conv, x, k).flops == 2 * (2 * 8 * 16 * 16) * 3 * 3 * 3
    grouped = lambda x, k: jax.lax.conv_general_dilated(x, k, (2, 2), "VALID", feature_group_count=4)
    x4, k4 = jax.ShapeDtypeStruct((1, 8, 9, 9), jnp.float32), jax.ShapeDtypeStruct((8, 2, 3, 3), jnp.float32)
    out = jax.eval_shape(grouped, x4, k4).shape
    assert flops.count(grouped, x4, k4).flops == 2 * np.prod(out) * 2 * 3 * 3


def test_while_loops_are_reported_as_uncounted():
    w = jax.ShapeDtypeStruct((4, 4), jnp.float32)
    c = flops.count(lambda w: jax.lax.fori_loop(0, jnp.int32(5) + 0 * w[0, 0].astype(jnp.int32),
                                                lambda i, m: m @ w, w), w)
    assert c.uncounted_loops == 1 and c.flops == 2 * 4 * 4 * 4
