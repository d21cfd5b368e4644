"""Training and evaluation: `train_and_evaluate(config, workdir)` in `moe_jax.train.loop`.

Modules, top-down: config (TrainConfig), optim (optax), state (TrainState), step (train step),
evaluate (eval step and statistics), inputs (the data pipeline as the loop sees it), checkpoint
(orbax), metrics (TensorBoard, JSON lines, progress bar), loop (the loop itself).
"""
