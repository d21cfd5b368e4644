"""One process of the two-process test (tests/test_multihost.py), and the tiny MoE experiment
that the sharded-training tests share (`CONFIG`, `SETTINGS`), so that their compilations are
shared through the persistent compilation cache (the two worker processes run without it).

    JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=i \
    XLA_FLAGS=--xla_force_host_platform_device_count=4 \
        python tests/multihost_worker.py STEPS[,STEPS...] --workdir=... [--config.x.y=v ...]

runs the command line (`moe_jax.main`, which joins the run through `jax.distributed` because of
the environment) on `CONFIG` with `SETTINGS` once per step count, in this same process: a later
run resumes from the checkpoint of the earlier one.
"""

import sys

CONFIG = "configs/dense.py:tiny"
# A sparse block 1 of 8 top-2 experts; routing groups of one sequence (group_size = seq_len),
# so that groups never span devices and routing is the same on every mesh. The constant
# schedule does not depend on num_train_steps, so a run stopped early and resumed with more
# steps sees the same learning rates as one uninterrupted run.
SETTINGS = {
    "model.d_model": 32, "model.num_layers": 2, "model.num_heads": 2, "model.d_ff": 64,
    "model.max_seq_len": 16, "model.moe_every": 2,
    "moe.num_experts": 8, "moe.top_k": 2, "moe.d_ff": 32, "moe.group_size": 16,
    "train.batch_size": 8, "train.num_train_steps": 6, "train.schedule": "constant",
    "train.warmup_steps": 1, "train.learning_rate": 1e-2, "train.log_every": 1,
    "train.eval_every": 0, "train.checkpoint_every": 2, "train.progress_bar": False,
    "data.name": "embedded_tiny", "data.eval_batches": 2,
}


def as_flags(settings: dict) -> list[str]:
    return [f"--config.{key}={value}" for key, value in settings.items()]


if __name__ == "__main__":
    from moe_jax import main

    step_counts, *flags = sys.argv[1:]
    for steps in step_counts.split(","):
        main.run_from_argv(["moe_jax.main", f"--config={CONFIG}", *as_flags(SETTINGS), *flags,
                            f"--config.train.num_train_steps={steps}"])
    import jax

    print(f"process {jax.process_index()} of {jax.process_count()}: "
          f"{jax.local_device_count()} local devices of {jax.device_count()}: done", flush=True)
