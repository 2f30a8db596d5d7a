"""One process of the two-process training test (run by tests/test_multiprocess.py, not by pytest)."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")


def main(coordinator, process_id, workdir, steps):
    jax.distributed.initialize(coordinator, num_processes=2, process_id=int(process_id))
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from configs import toy
    from flowjax.train import build

    c = toy.get_config("grpo")
    c.train.steps = int(steps)
    c.eval_every = int(steps)
    trainer = build(c, workdir)
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    trainer.train()
    trainer.close()
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
