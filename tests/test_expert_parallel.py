"""Expert parallelism of the MoE layer on 8 simulated CPU devices: both forms equal the
unsharded layer in values and gradients, and lay experts and buffers out as intended."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from moe_jax import MoeConfig, moe
from moe_jax.parallel import expert_parallel, sharding

MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (1, 8, 1), (2, 2, 2)]
D_MODEL, E = 8, 8
X = jax.random.normal(jax.random.key(1), (8, 8, D_MODEL))  # 8 sequences of 8 tokens
# One routing group per sequence, so groups never span devices and routing is identical
# sharded and unsharded.
BASE = MoeConfig(num_experts=E, d_ff=16, group_size=8, activation="swiglu")


def _loss(params, x, config, moe_sharding):
    y, aux = moe.apply(params, x, config, train=True, sharding=moe_sharding)
    return jnp.sum(jnp.sin(y)) + aux["load_balancing_loss"] + aux["router_z_loss"], aux


@functools.partial(jax.jit, static_argnums=(2, 3))
def loss_and_grads(params, x, config, moe_sharding):
    return jax.value_and_grad(_loss, argnums=(0, 1), has_aux=True)(params, x, config,
                                                                    moe_sharding)


def _mesh(shape):
    devices = jax.devices()[: int(np.prod(shape))]
    return sharding.make_mesh(sharding.MeshConfig(*shape), devices)


def _place(params, x, moe_sharding):
    specs = expert_parallel.expert_param_specs(params, moe_sharding)
    params = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(moe_sharding.mesh, s)),
                          params, specs)
    x = jax.device_put(x, NamedSharding(moe_sharding.mesh, moe_sharding.token_spec))
    return params, x


@pytest.mark.parametrize("shape", MESHES)
@pytest.mark.parametrize("form", ["gspmd", "explicit"])
@pytest.mark.parametrize(("k", "capacity"), [
    (2, None), (1, 8),
    pytest.param(1, None, marks=pytest.mark.slow), pytest.param(2, 16, marks=pytest.mark.slow),
])
def test_sharded_layer_equals_unsharded(shape, form, k, capacity):
    # capacity None: factor 1.25 drops some assignments; 8 / 16: nothing drops.
    config = BASE.replace(top_k=k, expert_capacity=capacity, renormalize_gates=k == 2)
    params = moe.init_params(jax.random.key(0), config, D_MODEL)
    (ref_loss, ref_aux), ref_grads = loss_and_grads(params, X, config, None)
    if capacity is None:
        assert float(ref_aux["dropped_fraction"]) > 0
    moe_sharding = expert_parallel.MoeSharding(_mesh(shape), form=form)
    (loss, aux), grads = loss_and_grads(*_place(params, X, moe_sharding), config, moe_sharding)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(aux["dropped_fraction"], ref_aux["dropped_fraction"], atol=1e-6)
    np.testing.assert_allclose(aux["expert_load"], ref_aux["expert_load"], atol=1e-6)
    for g, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, ref, rtol=2e-4, atol=2e-6)


def test_explicit_form_exchanges_buffers_with_all_to_all_and_keeps_experts_local():
    config = BASE.replace(top_k=2)
    moe_sharding = expert_parallel.MoeSharding(_mesh((2, 4, 1)), form="explicit")
    params, x = _place(moe.init_params(jax.random.key(0), config, D_MODEL), X, moe_sharding)
    hlo = loss_and_grads.lower(params, x, config, moe_sharding).compile().as_text()
    assert "all-to-all" in hlo
    wi = params["experts"]["wi"]
    assert wi.sharding.spec == PartitionSpec("expert", None, "model")
    assert sharding.device_bytes(wi) * 4 == wi.nbytes  # 1/expert_axis of the expert weights


def test_gspmd_form_constrains_buffers_to_the_expert_axis():
    config = BASE.replace(top_k=2)
    moe_sharding = expert_parallel.MoeSharding(_mesh((2, 4, 1)), form="gspmd")
    params, x = _place(moe.init_params(jax.random.key(0), config, D_MODEL), X, moe_sharding)
    text = loss_and_grads.lower(params, x, config, moe_sharding).as_text()
    # Buffers [G, E, C, d]: groups over data, experts over expert; tokens over (data, expert).
    assert '[{"data"}, {"expert"}, {}, {}]' in text
    assert '[{"data", "expert"}, {}, {}]' in text
    assert moe_sharding.buffer_spec == PartitionSpec(("data",), "expert")


def test_mesh_errors_name_the_numbers_and_the_fix():
    with pytest.raises(ValueError, match="needs 16 devices but 8 are available"):
        sharding.MeshConfig(data=2, expert=8).shape(8)
    with pytest.raises(ValueError, match="do not divide the 8 available devices"):
        sharding.MeshConfig(data=-1, expert=3).shape(8)
    assert sharding.MeshConfig(data=-1, expert=4).shape(8) == (2, 1, 4, 1)
    mesh = _mesh((2, 4, 1))
    with pytest.raises(ValueError, match="num_experts=6 does not divide over mesh axes"):
        sharding.check_divisible(mesh, num_experts=6)
    with pytest.raises(ValueError, match="global batch=12 does not divide"):
        sharding.check_divisible(mesh, global_batch=12)
    moe_sharding = expert_parallel.MoeSharding(mesh, form="explicit")
    params = moe.init_params(jax.random.key(0), BASE.replace(num_experts=6), D_MODEL)
    with pytest.raises(ValueError, match="num_experts=6 does not divide over the expert axis"):
        moe.apply(params, X, BASE.replace(num_experts=6), sharding=moe_sharding)
    with pytest.raises(ValueError, match="group_size=16 does not divide the 8 tokens per device"):
        moe.apply(moe.init_params(jax.random.key(0), BASE, D_MODEL), X,
                  BASE.replace(group_size=16), sharding=moe_sharding)


@pytest.mark.parametrize("form", ["gspmd", "explicit"])
def test_sharded_layer_with_padding_mask_equals_unsharded(form):
    # Uneven padding across devices: aux must be weighted by each device's unmasked tokens.
    config = BASE.replace(top_k=2)
    mask = jnp.arange(64).reshape(8, 8) < jnp.array([8, 3, 0, 8, 5, 8, 1, 8])[:, None]
    params = moe.init_params(jax.random.key(0), config, D_MODEL)

    def loss(params, x, mask, moe_sharding):
        y, aux = moe.apply(params, x, config, token_mask=mask, sharding=moe_sharding)
        return jnp.sum(jnp.sin(y)) + aux["load_balancing_loss"], aux

    ref = jax.value_and_grad(loss, has_aux=True)(params, X, mask, None)
    moe_sharding = expert_parallel.MoeSharding(_mesh((2, 4, 1)), form=form)
    p, x = _place(params, X, moe_sharding)
    out = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=3)(
        p, x, mask, moe_sharding)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


DROPLESS = BASE.replace(top_k=2, dispatch="dropless", renormalize_gates=True)


@pytest.mark.parametrize(("shape", "padded", "grouped_matmul"), [
    ((1, 8, 1), False, "auto"), ((2, 2, 2), True, "auto"),
    pytest.param((2, 4, 1), True, "megablox", marks=pytest.mark.slow),
])
def test_explicit_dropless_equals_unsharded(shape, padded, grouped_matmul):
    # Each device's routed rows go to their experts' devices with a ragged all-to-all (on CPU
    # its exact all_to_all equivalent) and back; uneven padding leaves devices uneven loads.
    config = DROPLESS.replace(grouped_matmul=grouped_matmul)
    mask = (jnp.arange(64).reshape(8, 8) < jnp.array([8, 3, 0, 8, 5, 8, 1, 8])[:, None]
            if padded else None)
    params = moe.init_params(jax.random.key(0), config, D_MODEL)

    def loss(params, x, mask, moe_sharding):
        y, aux = moe.apply(params, x, config, token_mask=mask, sharding=moe_sharding)
        return jnp.sum(jnp.sin(y)) + aux["load_balancing_loss"] + aux["router_z_loss"], aux

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=3)
    (ref_loss, ref_aux), ref_grads = grad_fn(params, X, mask, None)
    moe_sharding = expert_parallel.MoeSharding(_mesh(shape), form="explicit")
    (value, aux), grads = grad_fn(*_place(params, X, moe_sharding), mask, moe_sharding)
    np.testing.assert_allclose(value, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(aux["expert_load"], ref_aux["expert_load"], atol=1e-6)
    for g, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, ref, rtol=2e-4, atol=2e-6)
    assert float(jnp.abs(grads["experts"]["wi"]).sum()) > 0
