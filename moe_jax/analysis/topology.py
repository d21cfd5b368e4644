"""Devices to compile for without owning them, and the published figures of TPU chips.

    topology = get("v5p:4x4x4")        # 64 compile-only TPU v5p devices (needs libtpu)
    topology = get("v5p-128")          # the same slice by its Cloud accelerator type
    topology = get("cpu:8")            # 8 CPU devices of this process
    topology.devices, topology.chip    # for a Mesh; the chip's figures (None on CPU)

A TPU topology `<generation>:<shape>` (v4, v5e, v5p, v6e; shape as in `gcloud compute tpus`,
e.g. v5e:16x16, v5p:2x4x4) comes from libtpu (`pip install -e ".[tpu]"`) through
`jax.experimental.topologies`: devices that XLA compiles for, with no TPU attached. libtpu
exposes v4 as one device per TensorCore (2 per chip); v5e, v5p and v6e as one per chip.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from typing import Any

import jax

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures of a TPU generation (peak dense bf16 matmul FLOP/s, HBM
    capacity and bandwidth, inter-chip interconnect bandwidth). Google publishes HBM in "GB";
    taken here as GiB, the size of the chips' HBM stacks (the program gets a little less: the
    runtime reserves some).

    `ici_bytes_per_second` is the chip's bidirectional ICI bandwidth as Google's Cloud TPU pages
    state it: bytes per second in and out together, summed over all of the chip's ICI ports
    (v5e and v6e: 4 ports, a 2D torus; v4 and v5p: 6 ports, a 3D torus). One direction carries
    half of it. `ici_source` says where each figure comes from."""

    generation: str
    peak_bf16_flops: float
    hbm_bytes: int
    hbm_bytes_per_second: float
    source: str
    ici_bytes_per_second: float
    ici_source: str


CHIPS = {chip.generation: chip for chip in (
    # Cloud's v4 page gives no per-chip ICI figure; "How to Scale Your Model" (Austin et al.
    # 2025, "All about TPUs", the table of ICI bandwidths) gives 4.5e10 bytes/s per link and
    # direction: x 6 links x 2 directions.
    Chip("v4", 275e12, 32 * GIB, 1200e9, "https://cloud.google.com/tpu/docs/v4", 540e9,
         "https://jax-ml.github.io/scaling-book/tpus/ (4.5e10 B/s per link one way, 6 links)"),
    Chip("v5e", 197e12, 16 * GIB, 819e9, "https://cloud.google.com/tpu/docs/v5e", 400e9,
         "https://cloud.google.com/tpu/docs/v5e (bidirectional ICI per chip: 400 GBps)"),
    Chip("v5p", 459e12, 95 * GIB, 2765e9, "https://cloud.google.com/tpu/docs/v5p", 1200e9,
         "https://cloud.google.com/tpu/docs/v5p (bidirectional ICI per chip: 1200 GBps; "
         "older revisions: 4800 Gbps, i.e. 600 GB/s, half of it)"),
    Chip("v6e", 918e12, 32 * GIB, 1640e9, "https://cloud.google.com/tpu/docs/v6e", 800e9,
         "https://cloud.google.com/tpu/docs/v6e (bidirectional ICI per chip: 800 GBps)"),
)}
# Cloud accelerator types ("v5p-128") -> topology shapes, for the common single slices. v4 and
# v5p count TensorCores (2 per chip), v5e and v6e chips.
_SLICES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}
_SLICES_3D = {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8",
              512: "4x8x8", 1024: "8x8x8", 2048: "8x8x16", 4096: "8x16x16"}
ACCELERATOR_TYPES = {
    **{f"{g}-{n}": f"{g}:{shape}" for g in ("v5e", "v6e") for n, shape in _SLICES_2D.items()},
    **{f"{g}-{n}": f"{g}:{shape}" for g in ("v4", "v5p") for n, shape in _SLICES_3D.items()},
}
FORMS = ("v5p:4x4x4 (generation:shape; generations " + ", ".join(CHIPS) + "), v5p-128 (a Cloud "
         "accelerator type), or cpu:8 (CPU devices)")


@dataclasses.dataclass(frozen=True)
class Topology:
    """What to compile for: `devices` (compile-only on TPU) and their chip's figures."""

    name: str
    devices: tuple[Any, ...]
    chip: Chip | None = None  # None: CPU devices, no published figures
    devices_per_chip: int = 1

    @property
    def num_chips(self) -> int:
        return len(self.devices) // self.devices_per_chip

    @property
    def device_hbm_bytes(self) -> int | None:
        return None if self.chip is None else self.chip.hbm_bytes // self.devices_per_chip

    @property
    def device_peak_flops(self) -> float | None:
        return None if self.chip is None else self.chip.peak_bf16_flops / self.devices_per_chip

    @property
    def device_hbm_bytes_per_second(self) -> float | None:
        return (None if self.chip is None
                else self.chip.hbm_bytes_per_second / self.devices_per_chip)

    @property
    def device_ici_bytes_per_second(self) -> float | None:
        """One direction's ICI bandwidth per device (half the chip's bidirectional figure,
        shared by the chip's devices): what a device can send, or receive, per second."""
        return (None if self.chip is None
                else self.chip.ici_bytes_per_second / 2 / self.devices_per_chip)


def libtpu_installed() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def _unknown(name: str, why: str) -> ValueError:
    return ValueError(f"topology {name!r} {why}; pass {FORMS}.")


def _cpu(name: str, count: str) -> Topology:
    if not count.isdigit() or int(count) < 1:
        raise _unknown(name, "does not give a positive number of CPU devices")
    available = jax.devices("cpu")
    if int(count) > len(available):
        raise ValueError(
            f"topology {name!r} needs {count} CPU devices but this process has "
            f"{len(available)}; start Python with XLA_FLAGS=--xla_force_host_platform_device_count"
            f"={count} (python -m moe_jax.dryrun sets it itself when started with --topology).")
    return Topology(name, tuple(available[:int(count)]))


def get(name: str) -> Topology:
    """The topology called `name` (see the module docstring). Raises ValueError naming the
    accepted forms for an unknown name, and the install command when libtpu is missing."""
    if name.startswith("cpu:"):
        return _cpu(name, name[len("cpu:"):])
    spec = ACCELERATOR_TYPES.get(name, name)
    generation, sep, shape = spec.partition(":")
    if not sep or generation not in CHIPS:
        raise _unknown(name, f"is not a known TPU generation ({', '.join(CHIPS)}) or form")
    if not re.fullmatch(r"\d+(x\d+){1,2}", shape):
        raise _unknown(name, f"has no chip grid like 4x4 or 2x4x4 after {generation!r}")
    if not libtpu_installed():
        raise RuntimeError(
            f"compiling for topology {name!r} needs libtpu, which is not installed: run "
            "`pip install -e \".[tpu]\"` (jax's TPU extra, ~210 MB), or dry-run on CPU devices "
            "with --topology=cpu:8.")
    from jax.experimental import topologies

    # libtpu takes /tmp/libtpu_lockfile to keep a second process off the TPU; compile-only
    # devices touch no TPU, so several dry runs (or a dry run beside a test) may load it at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        devices = tuple(topologies.get_topology_desc(spec, "tpu").devices)
    except Exception as err:  # libtpu refuses shapes it does not support, with its own message
        raise _unknown(name, f"was refused by libtpu ({str(err).splitlines()[0][:200]})") from err
    chips = math.prod(int(n) for n in shape.split("x"))
    return Topology(spec, devices, CHIPS[generation], devices_per_chip=len(devices) // chips)
