"""Sparse upcycling (Komatsuzaki et al. 2022): a dense checkpoint becomes a sparse one.

    python -m moe_jax.interop.upcycle --from=WORKDIR_OR_HF_DIR --config=TARGET --workdir=OUT \
        [--config.model.moe_every=2 --config.moe.num_experts=8 ...] \
        [--expert_noise=0.0 --reinit_fraction=0.0] [--overwrite]

--from: a dense run's workdir (its newest checkpoint), a directory written by
`moe_jax.convert`, or a Hugging Face directory of a dense family (Llama, Qwen2). --config: the
sparse experiment (a config file, or a config.json such as the converted one's, with
overrides); its widths must be the dense model's and moe.d_ff / moe.activation the dense FFN's.
Each sparse block's experts become copies of that block's dense FFN (perturbed by
--expert_noise, or partly re-drawn by --reinit_fraction, Drop-Upcycling), its router is drawn
from the config's seed, and every other parameter is copied (`models.upcycling`).

OUT gets an initial checkpoint (checkpoints/0) and config.json with init.checkpoint = OUT;
training starts from it at step 0 with a fresh optimizer:

    python -m moe_jax.main --config=OUT/config.json --workdir=runs/NAME

(The same in one step, without OUT: `python -m moe_jax.main --config=TARGET
--config.init.checkpoint=DENSE_RUN --config.init.upcycle=True`.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags, logging

from moe_jax import interop, schema
from moe_jax.interop import conversion
from moe_jax.models import Transformer, upcycling
from moe_jax.train import checkpoint, init_from
from moe_jax.utils import storage


def read_dense(source: str) -> dict[str, Any]:
    """The dense parameters of a run/converted directory or a Hugging Face directory."""
    if interop.is_hf_directory(source):
        return interop.load(source).variables["params"]
    return checkpoint.read_weights(source)[0]["params"]


def upcycle(source: str, config: Any, workdir: str, *, noise: float = 0.0,
            reinit_fraction: float = 0.0, overwrite: bool = False) -> dict[str, Any]:
    """Upcycles the dense model of `source` into the sparse `config` in `workdir`."""
    experiment = schema.parse_config(config)
    dense = read_dense(source)
    model = Transformer(experiment.model, experiment.moe)
    seq_len = min(8, experiment.model.max_seq_len)
    fresh = nn.meta.unbox(jax.jit(lambda key: model.init(
        {"params": key}, jnp.zeros((1, seq_len), jnp.int32), train=False))(
        jax.random.key(experiment.seed)))
    key = jax.random.fold_in(jax.random.key(experiment.seed), init_from.UPCYCLE_KEY)
    params = upcycling.upcycle(dense, fresh["params"], experiment.model, key=key, noise=noise,
                               reinit_fraction=reinit_fraction)
    conversion.prepare_output(workdir, overwrite, conversion.WRITTEN)
    checkpoint.write_initial(workdir, {
        "params": jax.device_get(params),
        "model_state": jax.device_get({k: v for k, v in fresh.items() if k != "params"})}, {
        "by": "moe_jax.interop.upcycle", "from": storage.absolute(source), "expert_noise": noise,
        "reinit_fraction": reinit_fraction})
    return {"config": conversion.write_run_config(config, workdir),
            "sparse_layers": list(experiment.model.sparse_layers)}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    flags.DEFINE_string("from", None, "The dense model: a run's workdir, a moe_jax.convert "
                        "output, or a Hugging Face directory.", flag_values=flag_values)
    schema.define_config_flag("The sparse experiment config (file[:member] or a config.json) "
                              "with --config.<section>.<field> overrides.",
                              flag_values=flag_values)
    flags.DEFINE_string("workdir", None, "Where to write the upcycled checkpoint and config.",
                        flag_values=flag_values)
    flags.DEFINE_float("expert_noise", 0.0, "Each expert weight plus expert_noise * std(weight) "
                       "* N(0, 1).", flag_values=flag_values)
    flags.DEFINE_float("reinit_fraction", 0.0, "Drop-Upcycling: share of each expert's hidden "
                       "units re-drawn from N(mean, std^2) of the dense matrix.",
                       flag_values=flag_values)
    flags.DEFINE_bool("overwrite", False, "Replace an earlier output in --workdir.",
                      flag_values=flag_values)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {list(argv[1:])}.")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every read and write at INFO
        logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    if not (f["from"].value and f.config is not None and f.workdir):
        raise app.UsageError("use --from=DENSE --config=SPARSE_CONFIG --workdir=OUT.")
    try:
        written = upcycle(f["from"].value, f.config, f.workdir, noise=f.expert_noise,
                          reinit_fraction=f.reinit_fraction, overwrite=f.overwrite)
    except (ValueError, FileExistsError, FileNotFoundError, checkpoint.CheckpointError) as err:
        raise SystemExit(f"moe_jax.interop.upcycle: {type(err).__name__}: {err}") from err
    print(f"upcycled {f['from'].value} into {f.workdir} (sparse blocks "
          f"{written['sparse_layers']}); train with:\n  python -m moe_jax.main "
          f"--config={written['config']} --workdir=runs/NAME")


if __name__ == "__main__":
    define_flags()
    app.run(main)
