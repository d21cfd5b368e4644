"""Hugging Face safetensors <-> moe_jax parameters: one `Tensor` per array of ours, read and
written with the `safetensors` package (NumPy API, bfloat16 through ml_dtypes).

    table = tensors(family, model_config, moe_config)
    params = read(directory, table, shapes, tied=...)       # nested dict of NumPy arrays
    write(directory, params, table, dtype=..., tied=...)    # model.safetensors (or shards)

Layouts (HF `nn.Linear` weights are [out, in]): query [d, H, h] = q_proj.T reshaped; out
[H, h, d] = o_proj.T reshaped; biases [H, h] = q_proj.bias reshaped; router [d, E] = gate.T;
experts wi_gate / wi [E, d, f] = gate / up projections (w1 / w3 in Mixtral) transposed and
stacked over experts, wo [E, f, d] = down (w2), or (Llama 4) the halves of one gate_up_proj
[E, d, 2f] and down_proj [E, f, d] as they are (GPT-OSS: its even and odd columns, and the
biases gate_up_proj_bias [E, 2f] and down_proj_bias [E, d] alike); the shared experts' output
gate [d, 1] = shared_expert_gate.T. Every conversion is a transpose, a reshape or a column
selection, so export then import is the identity (bit-exact) and import then export
reproduces the files' tensors. MXFP4 expert tensors (`X_blocks` and `X_scales`, the released
GPT-OSS checkpoints) are dequantized on import (`read(..., mxfp4=True)`, `interop.mxfp4`);
export writes float weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from moe_jax.config import MoeConfig
from moe_jax.interop import mxfp4 as mxfp4_lib
from moe_jax.interop.hf_config import Family, UnsupportedModelError
from moe_jax.layers import STATE
from moe_jax.models.config import ModelConfig
from moe_jax.models.transformer import MOE_NAME, block_name

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Buffers some checkpoints carry that hold no parameters.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
FFN_NAMES = ("wi_gate", "wi", "wo")  # ours, in the order of Family.expert_names


class CheckpointMismatchError(ValueError):
    """The tensors of a Hugging Face directory disagree with its config.json."""


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One array of ours (`path` in the params tree) and the HF tensors it is made of: one
    name, or one per expert (stacked on our axis 0), each of `hf_shape`, transposed (an HF
    [out, in] weight) or not, then reshaped to ours."""

    path: tuple[str, ...]
    names: tuple[str, ...]
    hf_shape: tuple[int, ...]
    transpose: bool
    # (i, n): ours is the i-th of n equal blocks of the HF tensor's last axis (Llama 4's fused
    # gate_up_proj: gate, then up); `to_hf` gives the whole tensor, zero outside the block, and
    # the blocks of one tensor sum to it. `interleaved`: the block is the columns i::n instead
    # (GPT-OSS's gate_up_proj: gate the even columns, up the odd ones).
    part: tuple[int, int] | None = None
    interleaved: bool = False

    def _block(self) -> slice:
        i, n = self.part
        if self.interleaved:
            return slice(i, None, n)
        width = self.hf_shape[-1] // n
        return slice(i * width, (i + 1) * width)

    def to_ours(self, arrays: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        if self.part is not None:
            arrays = [a[..., self._block()] for a in arrays]
        stacked = len(self.names) > 1
        per = shape[1:] if stacked else shape
        parts = [(a.T if self.transpose else a).reshape(per) for a in arrays]
        return np.stack(parts) if stacked else parts[0]

    def to_hf(self, array: np.ndarray) -> list[np.ndarray]:
        parts = list(array) if len(self.names) > 1 else [array]
        shape = self.hf_shape
        if self.part is not None:
            shape = (*shape[:-1], shape[-1] // self.part[1])
        if self.transpose:
            out = [p.reshape(shape[::-1]).T for p in parts]
        else:
            out = [p.reshape(shape) for p in parts]
        if self.part is not None:
            whole = [np.zeros(self.hf_shape, p.dtype) for p in out]
            for w, p in zip(whole, out, strict=True):
                w[..., self._block()] = p
            out = whole
        return [np.ascontiguousarray(p) for p in out]


def _ffn(path: tuple[str, ...], prefix: str, names: tuple[str, str, str], d: int, f: int,
         experts: int = 0) -> list[Tensor]:
    """wi_gate, wi, wo of a SwiGLU FFN (one per expert when `experts`)."""
    out = []
    for ours, hf in zip(FFN_NAMES, names, strict=True):
        shape = (d, f) if ours == "wo" else (f, d)
        tensor_names = (tuple(f"{prefix}experts.{e}.{hf}.weight" for e in range(experts))
                        if experts else (f"{prefix}{hf}.weight",))
        out.append(Tensor((*path, ours), tensor_names, shape, True))
    return out


def _fused_experts(path: tuple[str, ...], prefix: str, d: int, f: int, experts: int, *,
                   interleaved: bool = False, bias: bool = False) -> list[Tensor]:
    """Llama 4's and GPT-OSS's experts: gate_up_proj [E, d, 2f] (x @ W; gate, then up, or with
    `interleaved` gate the even columns and up the odd ones) and down_proj [E, f, d], stored
    as ours are, without a transpose; with `bias`, gate_up_proj_bias [E, 2f] (split alike)
    and down_proj_bias [E, d]."""
    fused, down = f"{prefix}experts.gate_up_proj", f"{prefix}experts.down_proj"
    out = []
    for suffix, shape, down_shape in (("", (experts, d, 2 * f), (experts, f, d)),
                                      ("_bias", (experts, 2 * f), (experts, d)))[:1 + bias]:
        out += [Tensor((*path, f"wi_gate{suffix}"), (fused + suffix,), shape, False,
                       part=(0, 2), interleaved=interleaved),
                Tensor((*path, f"wi{suffix}"), (fused + suffix,), shape, False, part=(1, 2),
                       interleaved=interleaved),
                Tensor((*path, f"wo{suffix}"), (down + suffix,), down_shape, False)]
    return out


def _attention(i: int, model: ModelConfig) -> list[Tensor]:
    d, h, blk = model.d_model, model.head_size, block_name(i)
    prefix = f"model.layers.{i}.self_attn."
    out = []
    for ours, hf, n in (("query", "q", model.num_heads), ("key", "k", model.kv_heads),
                        ("value", "v", model.kv_heads)):
        out.append(Tensor((blk, "attention", ours), (f"{prefix}{hf}_proj.weight",), (n * h, d),
                          True))
        if model.qkv_bias:
            out.append(Tensor((blk, "attention", f"{ours}_bias"), (f"{prefix}{hf}_proj.bias",),
                              (n * h,), False))
        if model.qk_norm not in ("none", "weightless") and ours != "value":
            width = h if model.qk_norm == "per_head" else n * h
            out.append(Tensor((blk, "attention", f"{ours}_norm", "scale"),
                              (f"{prefix}{hf}_norm.weight",), (width,), False))
    out.append(Tensor((blk, "attention", "out"), (f"{prefix}o_proj.weight",),
                      (d, model.num_heads * h), True))
    if model.out_bias:
        out.append(Tensor((blk, "attention", "out_bias"), (f"{prefix}o_proj.bias",), (d,),
                          False))
    if model.attention_sinks:
        out.append(Tensor((blk, "attention", "sinks"), (f"{prefix}sinks",),
                          (model.num_heads,), False))
    return out


def _latent_attention(i: int, model: ModelConfig) -> list[Tensor]:
    """DeepSeek-V3's MLA tensors: q_a_proj / q_a_layernorm / q_b_proj (or q_proj),
    kv_a_proj_with_mqa / kv_a_layernorm / kv_b_proj, o_proj (`models.latent_attention`)."""
    d, heads, blk = model.d_model, model.num_heads, block_name(i)
    q, c, r = model.q_lora_rank, model.kv_lora_rank, model.qk_rope_head_dim
    n, v = model.qk_nope_head_dim, model.v_head_dim
    prefix = f"model.layers.{i}.self_attn."

    def tensor(ours: str, hf: str, shape: tuple[int, ...], transpose: bool = True) -> Tensor:
        return Tensor((blk, "attention", *ours.split("/")), (f"{prefix}{hf}",), shape, transpose)

    if q is None:
        out = [tensor("query", "q_proj.weight", (heads * (n + r), d))]
    else:
        out = [tensor("query_down", "q_a_proj.weight", (q, d)),
               tensor("query_norm/scale", "q_a_layernorm.weight", (q,), False),
               tensor("query_up", "q_b_proj.weight", (heads * (n + r), q))]
    return [*out, tensor("kv_down", "kv_a_proj_with_mqa.weight", (c + r, d)),
            tensor("kv_norm/scale", "kv_a_layernorm.weight", (c,), False),
            tensor("kv_up", "kv_b_proj.weight", (heads * (n + v), c)),
            tensor("out", "o_proj.weight", (d, heads * v))]


def tensors(family: Family, model: ModelConfig, moe: MoeConfig) -> list[Tensor]:
    """Every parameter of the Transformer for (model, moe) and its HF tensors in `family`;
    the sigmoid_bias router's score bias (DeepSeek-V3's `e_score_correction_bias`) is model
    state: its path starts with the collection `layers.STATE`."""
    d, vocab = model.d_model, model.vocab_size
    out = [Tensor(("embedding",), ("model.embed_tokens.weight",), (vocab, d), False),
           Tensor(("final_norm", "scale"), ("model.norm.weight",), (d,), False),
           Tensor(("output",), ("lm_head.weight",), (vocab, d), True)]
    sparse = set(model.sparse_layers)
    dense_names = ("gate_proj", "up_proj", "down_proj")
    for i in range(model.num_layers):
        blk, prefix = block_name(i), f"model.layers.{i}."
        out += [Tensor((blk, "attention_norm", "scale"), (f"{prefix}input_layernorm.weight",),
                       (d,), False),
                Tensor((blk, "ffn_norm", "scale"), (f"{prefix}post_attention_layernorm.weight",),
                       (d,), False)]
        out += _latent_attention(i, model) if model.latent_attention else _attention(i, model)
        if i not in sparse:
            out += _ffn((blk, "ffn"), f"{prefix}{family.dense_prefix}.", dense_names, d,
                        model.d_ff)
            continue
        mlp = f"{prefix}{family.moe_prefix}."
        out.append(Tensor((blk, MOE_NAME, "router", "kernel"),
                          (f"{mlp}{family.router_name}.weight",), (moe.num_experts, d), True))
        if moe.router_bias:
            out.append(Tensor((blk, MOE_NAME, "router", "bias"),
                              (f"{mlp}{family.router_name}.bias",), (moe.num_experts,), False))
        if family.fused_experts:
            out += _fused_experts((blk, MOE_NAME, "experts"), mlp, d, moe.d_ff, moe.num_experts,
                                  interleaved=family.interleaved_gate_up, bias=moe.expert_bias)
        else:
            out += _ffn((blk, MOE_NAME, "experts"), mlp, family.expert_names, d, moe.d_ff,
                        moe.num_experts)
        if moe.router == "sigmoid_bias":  # model state, not a parameter
            out.append(Tensor((STATE, blk, MOE_NAME, "score_bias"),
                              (f"{mlp}gate.e_score_correction_bias",), (moe.num_experts,),
                              False))
        if moe.num_shared_experts:
            out += _ffn((blk, MOE_NAME, "shared"), f"{mlp}{family.shared_prefix}.", dense_names,
                        d, moe.num_shared_experts * moe.d_ff)
        if moe.shared_expert_gate:
            out.append(Tensor((blk, MOE_NAME, "shared", "output_gate"),
                              (f"{mlp}shared_expert_gate.weight",), (1, d), True))
    return out


def tensor_files(directory: str) -> dict[str, str]:
    """{tensor name: safetensors file} of an HF directory (sharded with an index, or not)."""
    index = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(directory, file) for name, file in weight_map.items()}
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        found = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
        raise CheckpointMismatchError(
            f"{directory} holds no .safetensors files (found {found[:10]}); moe_jax reads "
            "safetensors only: save the model with save_pretrained(safe_serialization=True).")
    out = {}
    for file in files:
        with safe_open(file, framework="numpy") as f:
            out.update(dict.fromkeys(f.keys(), file))
    return out


def _shape_of(file: str, name: str) -> tuple[int, ...]:
    with safe_open(file, framework="numpy") as f:
        return tuple(f.get_slice(name).get_shape())


def _tied(table: list[Tensor]) -> list[Tensor]:
    """The table with the output matrix read from (written as) the token embedding."""
    return [dataclasses.replace(t, names=("model.embed_tokens.weight",))
            if t.path == ("output",) else t for t in table]


def read(directory: str, table: list[Tensor], shapes: dict[str, Any], *,
         tied: bool = False, where: str = "", skip: tuple[str, ...] = (),
         mxfp4: bool = False) -> dict[str, Any]:
    """Our parameters (NumPy, float32) from the HF tensors of `directory`.

    shapes: the model's params tree of ShapeDtypeStructs (what each Tensor becomes).
    tied: tie_word_embeddings (the output matrix is the embedding's transpose).
    skip: prefixes of tensor names that are not read (e.g. DeepSeek-V3's MTP layers).
    mxfp4: a tensor X stored as `X_blocks` and `X_scales` is read dequantized
    (`mxfp4.unpack_expert`; GPT-OSS's quantization_config "mxfp4").
    Raises CheckpointMismatchError naming every missing or extra tensor and every shape that
    disagrees with config.json.
    """
    files = tensor_files(directory)
    packed = mxfp4_lib.packed_names(files) if mxfp4 else {}
    table = _tied(table) if tied else table

    def shape_of(name: str) -> tuple[int, ...]:
        if name in packed:
            return mxfp4_lib.unpacked_shape(_shape_of(files[packed[name][0]], packed[name][0]))
        return _shape_of(files[name], name)

    problems = []
    for t in table:
        for name in t.names:
            file = files.get(name) or (files[packed[name][0]] if name in packed else None)
            if file is None:
                problems.append(f"{name}: missing (config.json implies shape {list(t.hf_shape)})")
            elif (found := shape_of(name)) != t.hf_shape:
                problems.append(f"{name}: shape {list(found)} in {os.path.basename(file)}"
                                f", config.json implies {list(t.hf_shape)}")
    expected = {name for t in table for name in t.names}
    expected |= {part for name in expected if name in packed for part in packed[name]}
    if tied:  # some tied checkpoints also store the (identical) output matrix
        expected.add("lm_head.weight")
    extra = sorted(n for n in files if n not in expected and not n.endswith(IGNORED_SUFFIXES)
                   and not n.startswith(skip))
    if extra:
        problems.append(f"tensors the config does not use: {extra[:10]}"
                        + (f" and {len(extra) - 10} more" if len(extra) > 10 else ""))
    if problems:
        raise CheckpointMismatchError(
            f"the tensors of {directory} do not match its config.json{where}:\n  "
            + "\n  ".join(problems))
    params: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        handles = {file: stack.enter_context(safe_open(file, framework="numpy"))
                   for file in set(files.values())}

        def get(name: str) -> np.ndarray:
            if name in files:
                return handles[files[name]].get_tensor(name)
            blocks, scales = packed[name]
            return mxfp4_lib.unpack_expert(handles[files[blocks]].get_tensor(blocks),
                                           handles[files[scales]].get_tensor(scales))

        for t in table:
            like = _at(shapes, t.path)
            arrays = [get(name) for name in t.names]
            _set(params, t.path, t.to_ours(arrays, tuple(like.shape)).astype(like.dtype))
    return params


def write(directory: str, params: dict[str, Any], table: list[Tensor], *, dtype: str,
          tied: bool = False, max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Writes `params` as HF safetensors of `dtype` (one file, or shards of at most
    `max_shard_bytes` with model.safetensors.index.json); returns the files written."""
    np_dtype = np.dtype(_numpy_dtype(dtype))
    tensors_out: dict[str, np.ndarray] = {}
    for t in (_tied(table) if tied else table):
        if tied and t.path == ("output",):
            continue
        for name, array in zip(t.names, t.to_hf(np.asarray(_at(params, t.path))), strict=True):
            if name in tensors_out:  # the blocks of a fused tensor (`Tensor.part`)
                array = tensors_out[name] + array
            tensors_out[name] = array.astype(np_dtype)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors_out):
        nbytes = tensors_out[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors_out[name]
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, SINGLE_FILE), metadata=metadata)
        return [SINGLE_FILE]
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, shard in zip(files, shards, strict=True):
        save_file(shard, os.path.join(directory, file), metadata=metadata)
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors_out.values())},
             "weight_map": {name: file for file, shard in zip(files, shards, strict=True)
                            for name in shard}}
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    return [*files, INDEX_FILE]


def _numpy_dtype(name: str) -> Any:
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    if name not in ("float32", "float16", "float64"):
        raise UnsupportedModelError(f"dtype {name!r} is not supported for export; use "
                                    "float32, bfloat16 or float16.")
    return name


def _at(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
