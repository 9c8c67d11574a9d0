"""The fused site reducer (one product per site) against a by-hand computation of every kind."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sidecar.models.registry import REFERENCE_DIR, REFERENCE_SPEC
from sidecar.probe.graph.reduce import SiteReducer, SiteShard, float32_products
from sidecar.spec.cost import probe_flops_per_token
from sidecar.spec.identity import read_model_shape
from sidecar.spec.load import load_spec
from sidecar.spec.schema import Component, ComponentKind
from sidecar.spec.sites import Site, SiteKind

D_MODEL, N_HEADS, D_HEAD, T = 16, 4, 8, 7
Z_SITE = Site.parse("blocks.0.attn.hook_z")
RESID_SITE = Site.parse("blocks.0.hook_resid_post")


def head(name: str, h: int, direction: torch.Tensor | None = None, bias: float = 0.0):
    # Specs hold directions as float32 numpy arrays (load.py), so the tests' components do too.
    u = None if direction is None else direction.numpy()
    return Component(name, ComponentKind.HEAD, Z_SITE, h, u, bias)


def direction(name: str, site: Site, w: torch.Tensor, bias: float = 0.0):
    return Component(name, ComponentKind.DIRECTION, site, None, w.numpy(), bias)


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "z": torch.randn(T, N_HEADS * D_HEAD, generator=g),
        "w_o": torch.randn(D_MODEL, N_HEADS * D_HEAD, generator=g),
        "u": torch.randn(D_MODEL, generator=g),
        "w_z": torch.randn(N_HEADS * D_HEAD, generator=g),
        "x": torch.randn(T, D_MODEL, generator=g),
        "w_x": torch.randn(D_MODEL, generator=g),
    }


def full_z_shard(w_o: torch.Tensor) -> SiteShard:
    return SiteShard(
        width=N_HEADS * D_HEAD,
        columns=slice(0, N_HEADS * D_HEAD),
        replicated=False,
        heads=range(N_HEADS),
        d_head=D_HEAD,
        o_proj_weight=w_o,
    )


def by_hand(component: Component, z: torch.Tensor, w_o: torch.Tensor) -> torch.Tensor:
    """The shared semantics, written out: c = z_h @ W_O_h^T, then ||c|| or c.u + b."""
    if component.kind is ComponentKind.DIRECTION:
        return z @ torch.from_numpy(component.direction) + component.bias
    cols = slice(component.head * D_HEAD, (component.head + 1) * D_HEAD)
    c = z[:, cols] @ w_o[:, cols].T
    if component.direction is None:
        return c.norm(dim=-1)
    return c @ torch.from_numpy(component.direction) + component.bias


def test_every_kind_on_hook_z_matches_by_hand(tensors):
    z, w_o = tensors["z"], tensors["w_o"]
    components = [
        head("norm2", 2),
        head("dir1", 1, tensors["u"], bias=0.25),
        direction("zdir", Z_SITE, tensors["w_z"], bias=-1.5),
        head("norm0", 0),
    ]
    reducer = SiteReducer(list(enumerate(components)), full_z_shard(w_o))
    values = reducer(z)
    ids = reducer.layout.component_ids
    assert sorted(ids) == [0, 1, 2, 3]
    assert reducer.layout.shipped == (0, 1, 2, 3)
    for column, index in enumerate(ids):
        expected = by_hand(components[index], z, w_o)
        torch.testing.assert_close(values[:, column], expected, rtol=1e-5, atol=1e-5)


def test_residual_directions_are_computed_by_rank_zero_only(tensors):
    x, w = tensors["x"], tensors["w_x"]
    shard = SiteShard(width=D_MODEL, columns=slice(0, D_MODEL), replicated=True)
    components = [(5, direction("probe", RESID_SITE, w, bias=0.5))]
    rank0 = SiteReducer(components, shard, rank=0)
    rank1 = SiteReducer(components, shard, rank=1)
    torch.testing.assert_close(rank0(x)[:, 0], x @ w + 0.5)
    assert rank0.layout.component_ids == (5,)
    assert rank1.num_columns == 0


def test_tensor_parallel_shards_sum_to_the_whole(tensors):
    """Two ranks, two heads each: heads go to their owner; a direction over the whole
    hook_z is a partial sum on each rank, all-reduced, and shipped by rank 0 alone."""
    z, w_o = tensors["z"], tensors["w_o"]
    components = [
        head("h0", 0),
        head("h3", 3, tensors["u"], bias=1.0),
        direction("zdir", Z_SITE, tensors["w_z"], bias=2.0),
    ]
    half = 2 * D_HEAD
    partials = {}

    def record(rank):
        def all_reduce(t):  # stands in for the collective: remember, sum below
            partials[rank] = t.clone()
            return t

        return all_reduce

    outputs, layouts = [], []
    for rank in (0, 1):
        cols = slice(rank * half, (rank + 1) * half)
        shard = SiteShard(
            width=half,
            columns=cols,
            replicated=False,
            heads=range(2 * rank, 2 * rank + 2),
            d_head=D_HEAD,
            o_proj_weight=w_o[:, cols],
        )
        reducer = SiteReducer(list(enumerate(components)), shard, rank, record(rank))
        outputs.append(reducer(z[:, cols]))
        layouts.append(reducer.layout)
    assert layouts[0].component_ids == (0, 2) and layouts[0].shipped == (0, 1)
    assert layouts[1].component_ids == (1, 2) and layouts[1].shipped == (0,)
    torch.testing.assert_close(outputs[0][:, 0], by_hand(components[0], z, w_o))
    torch.testing.assert_close(outputs[1][:, 0], by_hand(components[1], z, w_o))
    summed = partials[0] + partials[1] + 2.0
    torch.testing.assert_close(summed[:, 0], by_hand(components[2], z, w_o), rtol=1e-5, atol=1e-5)


def test_reducer_traces_into_one_graph_with_dynamic_token_count(tensors):
    """What the taps rely on: no graph break and no shape specialisation on T."""
    z, w_o = tensors["z"], tensors["w_o"]
    components = [head("norm1", 1), direction("zdir", Z_SITE, tensors["w_z"])]
    reducer = SiteReducer(list(enumerate(components)), full_z_shard(w_o))
    compiled = torch.compile(reducer, fullgraph=True, backend="eager", dynamic=True)
    for tokens in (3, 7):
        torch.testing.assert_close(compiled(z[:tokens]), reducer(z[:tokens]))


def test_bfloat16_activations_are_reduced_in_float32(tensors):
    x, w = tensors["x"], tensors["w_x"]
    shard = SiteShard(width=D_MODEL, columns=slice(0, D_MODEL), replicated=True)
    reducer = SiteReducer([(0, direction("p", RESID_SITE, w))], shard)
    values = reducer(x.to(torch.bfloat16))
    assert values.dtype == torch.float32
    torch.testing.assert_close(values[:, 0], x.to(torch.bfloat16).float() @ w)


def test_a_head_norm_by_hand():
    """W_O_h = [[3, 0], [4, 0], [0, 1]]: z = (1, 0) gives c = (3, 4, 0), ||c|| = 5; z = (0, 3)
    gives c = (0, 0, 3); z = (1, 2) gives c = (3, 4, 2), sqrt(29). Beside it, head 1 along
    u = (1, 1, 1) with bias 1: W_O_1 = [[1, 0], [0, 1], [1, 1]], z_1 = (2, -1) gives
    c = (2, -1, 1), c . u + 1 = 3."""
    w_o = torch.tensor([[3.0, 0.0, 1.0, 0.0], [4.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    shard = SiteShard(4, slice(0, 4), False, heads=range(2), d_head=2, o_proj_weight=w_o)
    components = [
        Component("n0", ComponentKind.HEAD, Z_SITE, 0, None, 0.0),
        Component("u1", ComponentKind.HEAD, Z_SITE, 1, torch.ones(3).numpy(), 1.0),
    ]
    reducer = SiteReducer(list(enumerate(components)), shard)
    z = torch.tensor([[1.0, 0.0, 2.0, -1.0], [0.0, 3.0, 2.0, -1.0], [1.0, 2.0, 2.0, -1.0]])
    values = reducer(z)
    assert reducer.layout.component_ids == (1, 0)  # linear columns first, then norms
    torch.testing.assert_close(values[:, 0], torch.tensor([3.0, 3.0, 3.0]))
    torch.testing.assert_close(values[:, 1], torch.tensor([5.0, 3.0, math.sqrt(29.0)]))


def test_a_head_alone_is_read_out_of_its_own_columns_in_one_product(tensors):
    """Head 2 by norm and along a direction: one product over its columns 16..24
    ([T, 8] x [8, 1 + 8]), so whatever the other heads hold never enters it."""
    z, w_o = tensors["z"].clone(), tensors["w_o"]
    components = [head("norm2", 2), head("dir2", 2, tensors["u"], bias=-0.5)]
    reducer = SiteReducer(list(enumerate(components)), full_z_shard(w_o))
    assert reducer.norms_joined and (reducer.lo, reducer.hi) == (2 * D_HEAD, 3 * D_HEAD)
    assert reducer.product_flops == 2 * D_HEAD * (1 + D_HEAD)
    expected = [by_hand(c, z, w_o) for c in components]
    z[:, : 2 * D_HEAD] = float("nan")
    z[:, 3 * D_HEAD :] = float("nan")
    values = reducer(z)
    for column, index in enumerate(reducer.layout.component_ids):
        torch.testing.assert_close(values[:, column], expected[index], rtol=1e-5, atol=1e-5)


def test_heads_far_apart_get_a_batched_product_over_their_own_columns(tensors):
    """Heads 0 and 3 by norm: in one product they would cost 4x their own multiply-adds
    (columns 0..32 for each), so they get a batched one over their 8 columns each; a
    direction through head 3 still has its product."""
    z, w_o = tensors["z"].clone(), tensors["w_o"]
    components = [head("norm3", 3), head("norm0", 0), head("dir3", 3, tensors["u"], bias=1.0)]
    reducer = SiteReducer(list(enumerate(components)), full_z_shard(w_o))
    assert not reducer.norms_joined
    assert reducer.product_flops == 2 * 2 * D_HEAD * D_HEAD + 2 * D_HEAD
    expected = [by_hand(c, z, w_o) for c in components]
    z[:, D_HEAD : 3 * D_HEAD] = float("nan")
    values = reducer(z)
    for column, index in enumerate(reducer.layout.component_ids):
        torch.testing.assert_close(values[:, column], expected[index], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("float32_out", [False, True])
def test_bfloat16_products_stay_within_the_rounding_of_the_weights(tensors, float32_out):
    """A bfloat16 model's reducer multiplies in bfloat16 (no float32 copy of the site) with
    float32 accumulation. Weights rounded to bfloat16 (unit roundoff 2^-8) move a direction's
    value by at most 2^-8 sum_i |x_i w_i| and a head's norm by at most 2^-8 ||z_h|| ||W_O_h||_F;
    a bfloat16 result (no float32 output) adds 2^-8 of the value itself."""
    if float32_out and not float32_products(torch.bfloat16, torch.device("cpu")):
        pytest.skip("torch.mm has no bfloat16 -> float32 product on this backend")
    z = tensors["z"].to(torch.bfloat16)
    w_o, w = tensors["w_o"], tensors["w_z"]
    components = [head("norm2", 2), direction("zdir", Z_SITE, w, bias=0.5), head("norm0", 0)]
    reducer = SiteReducer(
        list(enumerate(components)), full_z_shard(w_o), dtype=torch.bfloat16,
        float32_out=float32_out,
    )  # fmt: skip
    assert reducer.weight.dtype == torch.bfloat16
    values = reducer(z)
    assert values.dtype == torch.float32
    exact = z.double()
    u = 2.0**-8
    for column, index in enumerate(reducer.layout.component_ids):
        component = components[index]
        if component.kind is ComponentKind.DIRECTION:
            truth = exact @ w.double() + component.bias
            bound = u * (exact.abs() @ w.abs().double())
        else:
            cols = slice(component.head * D_HEAD, (component.head + 1) * D_HEAD)
            truth = (exact[:, cols] @ w_o[:, cols].double().T).norm(dim=-1)
            bound = u * exact[:, cols].norm(dim=-1) * w_o[:, cols].double().norm()
        if not float32_out:
            bound = bound + u * truth.abs()
        error = (values[:, column].double() - truth).abs()
        assert (error <= bound + 1e-6).all(), (component.name, error.max(), bound.min())
        assert error.max() > 0  # the products really ran in bfloat16


def test_the_specs_cost_estimate_counts_exactly_what_its_reducers_run():
    """sidecar.spec.cost estimates a spec's in-graph FLOPs without torch; the reducers the
    probe builds from the same spec on one rank run exactly that many (plus the sums of the
    residual stream's two tensors, which are not the reducers')."""
    shape = read_model_shape(REFERENCE_DIR)
    weights = load_file(REFERENCE_DIR / "model.safetensors")
    z0, z1 = Site(0, SiteKind.ATTN_Z), Site(1, SiteKind.ATTN_Z)
    rng = np.random.default_rng(0)
    extra = [  # far-apart norms with a head direction, a lone head direction, an MLP direction
        Component("n0", ComponentKind.HEAD, z0, 0),
        Component("n3", ComponentKind.HEAD, z0, 3),
        Component("u1", ComponentKind.HEAD, z0, 1, rng.normal(size=shape.d_model), 0.5),
        Component("u2", ComponentKind.HEAD, z1, 2, rng.normal(size=shape.d_model)),
        Component("m", ComponentKind.DIRECTION, Site(1, SiteKind.MLP_POST), None,
                  rng.normal(size=shape.d_mlp)),
    ]  # fmt: skip
    reference = load_spec(REFERENCE_SPEC)
    for spec in (reference, replace(reference, components=tuple(extra))):
        run = 0
        for site in spec.sites:
            width = shape.width(site)
            heads = site.kind is SiteKind.ATTN_Z
            shard = SiteShard(
                width,
                slice(0, width),
                site.kind is SiteKind.RESID_POST,
                range(shape.n_heads) if heads else range(0),
                shape.d_head,
                weights[f"model.layers.{site.layer}.self_attn.o_proj.weight"] if heads else None,
            )
            components = [(i, c) for i, c in enumerate(spec.components) if c.site == site]
            run += SiteReducer(components, shard).product_flops
        sums = sum(shape.d_model for s in spec.sites if s.kind is SiteKind.RESID_POST)
        assert probe_flops_per_token(spec, shape) == run + sums
