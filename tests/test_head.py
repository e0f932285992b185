"""The factorised dense head equals the naive (hypercolumn) head, forward and gradients; exact MLP conversion."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from footprints.benchmarks.head import compare_heads
from footprints.model.backbone import LAYER_CHANNELS, LAYER_SCALE, hypercolumn_channels, resolve_layers
from footprints.model.head import DenseHead, NaiveHead, evaluated_positions, sample_bilinear, upsample_grid
from footprints.model.mlp import MLP


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def random_acts(layers: list[str], batch: int, size: tuple[int, int], dtype=torch.float64, grad=False, seed=0):
    """Activations shaped like VGG's for an input of `size` (floor division by each layer's scale)."""
    gen = torch.Generator().manual_seed(seed)
    acts = {}
    for n in layers:
        s = LAYER_SCALE[n]
        t = torch.rand(batch, LAYER_CHANNELS[n], size[0] // s, size[1] // s, generator=gen, dtype=dtype)
        acts[n] = t.requires_grad_(grad)
    return acts


def random_mlp(c: int, hidden: int, seed: int = 0, classes: int = 2) -> MLP:
    gen = torch.Generator().manual_seed(seed)
    mlp = MLP(c, hidden, dropout=0.5, mean=torch.rand(c, generator=gen), std=0.3 + torch.rand(c, generator=gen),
              num_classes=classes)
    with torch.no_grad():  # all layers of the hypercolumn must matter in the comparisons
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return mlp.eval()


def test_evaluated_positions():
    assert evaluated_positions(256, 2).tolist() == list(range(0, 256, 4))
    assert len(evaluated_positions(256, 2)) == 64
    assert evaluated_positions(64, 1).tolist() == list(range(64))
    # conv1 (stride 2) on 10 px reads 0,2,4,6,8 -> 5 outputs; conv2 reads 0,2,4 of those -> pixels 0,4,8
    assert evaluated_positions(10, 2).tolist() == [0, 4, 8]
    assert evaluated_positions(9, 3).tolist() == [0]  # 9 px, stride 3: conv1 reads 0,3,6; conv2 reads 0 only


@pytest.mark.parametrize("in_size,out_size", [((16, 16), (64, 64)), ((7, 5), (50, 23)), ((64, 64), (64, 64)),
                                              ((32, 8), (64, 64))])
def test_sample_bilinear_matches_interpolate(in_size, out_size):
    gen = torch.Generator().manual_seed(1)
    f = torch.randn(2, 3, *in_size, generator=gen, dtype=torch.float64)
    full = F.interpolate(f, size=out_size, mode="bilinear", align_corners=False)
    rows = torch.tensor([0, 1, out_size[0] // 2, out_size[0] - 1])
    cols = torch.arange(0, out_size[1], 3)
    got = sample_bilinear(f, out_size, rows, cols)
    assert torch.allclose(got, full[:, :, rows][:, :, :, cols], rtol=0, atol=1e-12)


def test_upsample_grid_puts_nodes_on_their_pixels():
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(1, 2, 5, 4, generator=gen, dtype=torch.float64)
    out = upsample_grid(g, (20, 16), 4)
    assert out.shape == (1, 2, 20, 16)
    assert torch.equal(out[:, :, ::4, ::4], g)  # node k is pixel 4k, unchanged
    # between nodes: linear; size (n-1)*step+1 is exactly align_corners=True interpolation
    ref = F.interpolate(g, size=(17, 13), mode="bilinear", align_corners=True)
    assert torch.allclose(out[:, :, :17, :13], ref, atol=1e-12)
    held = ref[:, :, 16:17, :].expand(-1, -1, 3, -1)
    assert torch.allclose(out[:, :, 17:, :13], held, atol=1e-12)  # held past the last node
    assert upsample_grid(g, (5, 4), 1) is g


@pytest.mark.parametrize("stride,size,layers", [
    (2, (64, 64), "all"),
    (1, (32, 32), "all"),
    (2, (32, 48), "all"),
    (2, (32, 32), ["conv1_2", "conv3_3", "conv5_3"]),  # a subset: column slices must line up
    (3, (48, 48), "pool"),
])
def test_factorised_equals_naive_forward_and_gradients(stride, size, layers):
    layers = resolve_layers(layers)
    torch.manual_seed(0)
    dense = DenseHead(layers, hidden=24, stride=stride).double().eval()
    with torch.no_grad():
        for p in dense.parameters():  # default init leaves deep-layer columns tiny; make every input count
            p.copy_(torch.randn_like(p) / (p.shape[1] if p.dim() > 1 else 1) ** 0.5)
    naive = NaiveHead.from_dense(dense).double().eval()
    acts_f = random_acts(layers, 2, size, grad=True)
    acts_n = {k: v.detach().clone().requires_grad_(True) for k, v in acts_f.items()}

    out_f = dense(acts_f, size)
    out_n = naive(acts_n, size)
    rows, cols = evaluated_positions(size[0], stride), evaluated_positions(size[1], stride)
    assert out_f.shape == out_n.shape == (2, 2, len(rows), len(cols))
    assert rel_diff(out_f, out_n) < 1e-10  # float64: the 1e-4 requirement with a wide margin

    w = torch.randn(out_n.shape, dtype=torch.float64)
    (out_f * w).sum().backward()
    (out_n * w).sum().backward()
    for name, p in dense.named_parameters():
        q = dict(naive.named_parameters())[name]
        assert p.grad is not None and p.grad.abs().max() > 0, name
        assert rel_diff(p.grad, q.grad) < 1e-10, name
    for n in layers:  # what a trainable backbone receives
        assert acts_n[n].grad.abs().max() > 0, n
        assert rel_diff(acts_f[n].grad, acts_n[n].grad) < 1e-10, n


def test_factorised_equals_naive_float32_within_1e4():
    layers = resolve_layers("all")
    size = (64, 64)
    torch.manual_seed(1)
    dense = DenseHead(layers, hidden=64, stride=2).eval()
    naive = NaiveHead.from_dense(dense).eval()
    acts = random_acts(layers, 2, size, dtype=torch.float32)
    out_f, out_n = dense(acts, size), naive(acts, size)
    out_f.sum().backward()
    out_n.sum().backward()
    assert rel_diff(out_f, out_n) < 1e-4
    for name, p in dense.named_parameters():
        assert rel_diff(p.grad, dict(naive.named_parameters())[name].grad) < 1e-4, name


@pytest.mark.parametrize(("stride", "classes"), [(2, 2), (1, 2), (2, 4)])
def test_conversion_from_mlp_is_exact(stride, classes):
    """On sampled pixels of the evaluated grid the converted head's logits are the MLP's (float32), for any
    number of classes (the instance-aware targets have 3 or 4)."""
    layers = resolve_layers("all")
    c = hypercolumn_channels(layers)
    mlp = random_mlp(c, 128, classes=classes)
    size = (64, 64)
    acts = random_acts(layers, 2, size, dtype=torch.float32, seed=3)
    # reference hypercolumns: the naive upsample + concatenate
    hyper = NaiveHead(layers, 8, stride).hypercolumns(acts, size)  # (B, C, H, W), un-normalised
    with torch.no_grad():
        grid = DenseHead.from_mlp(mlp, layers, stride)(acts, size)
        seed_head = NaiveHead.from_mlp(mlp, layers, stride)(acts, size)  # the seed's, normaliser explicit
    rows, cols = evaluated_positions(size[0], stride), evaluated_positions(size[1], stride)
    gen = torch.Generator().manual_seed(4)
    b = torch.randint(0, 2, (40,), generator=gen)
    i = torch.randint(0, len(rows), (40,), generator=gen)
    j = torch.randint(0, len(cols), (40,), generator=gen)
    with torch.no_grad():
        expected = mlp(hyper[b, :, rows[i], cols[j]])  # (40, classes)
    got = grid[b, :, i, j]
    assert got.shape == expected.shape == (40, classes)
    scale = max(1.0, float(expected.abs().max()))
    assert expected.abs().max() > 0.1  # the comparison is not between near-zeros
    assert float((got - expected).abs().max()) <= 1e-5 * scale
    assert float((seed_head[b, :, i, j] - expected).abs().max()) <= 1e-5 * scale


def test_conversion_checks_channels_and_keeps_dropout():
    mlp = MLP(10, 8, dropout=0.3)
    with pytest.raises(ValueError, match="input channels"):
        DenseHead.from_mlp(mlp, ["conv1_1"], 2)
    layers = ["input", "conv1_1"]
    head = DenseHead.from_mlp(MLP(67, 16, dropout=0.3), layers, 2)
    assert head.dropout.p == 0.3
    acts = random_acts(layers, 1, (32, 32), dtype=torch.float32)
    head.train()
    torch.manual_seed(0)
    a = head(acts, (32, 32))
    torch.manual_seed(1)
    b = head(acts, (32, 32))
    assert not torch.equal(a, b)  # dropout active in training
    head.eval()
    assert torch.equal(head(acts, (32, 32)), head(acts, (32, 32)))


def test_compare_heads_small():
    """The benchmark's machinery on a tiny input: equal outputs, and the naive head needs more memory."""
    r = compare_heads(batch=1, size=64, hidden=32, layers="all", stride=2, fast_reps=1, naive_reps=1)
    assert r["max_rel_diff"] < 1e-4 and r["grad_rel_err"] < 1e-4
    # naive: at least the 64x64x4227 float32 hypercolumn (69 MB); fast: far less
    assert r["naive_peak_bytes"] >= 64 * 64 * 4227 * 4
    assert 0 < r["fast_peak_bytes"] < r["naive_peak_bytes"] / 10
    assert r["naive_s"] > 0 and r["fast_s"] > 0 and r["device"] == "cpu"


def test_frozen_activations_float64_and_cached_geometry():
    """The usual case (frozen backbone, no gradient into the activations) is exact too, across patch sizes
    that share the head (cached sampling matrices per geometry must not leak between sizes)."""
    layers = resolve_layers("all")
    torch.manual_seed(5)
    dense = DenseHead(layers, hidden=16, stride=2).double().eval()
    with torch.no_grad():
        for p in dense.parameters():
            p.copy_(torch.randn_like(p) / (p.shape[1] if p.dim() > 1 else 1) ** 0.5)
    naive = NaiveHead.from_dense(dense).double().eval()
    assert {k: tuple(v.shape) for k, v in dense.state_dict().items()} == {
        "conv1.weight": (16, 4227, 1, 1), "conv1.bias": (16,), "conv2.weight": (16, 16, 1, 1),
        "conv2.bias": (16,), "conv3.weight": (2, 16, 1, 1), "conv3.bias": (2,), "mean": (4227,), "std": (4227,)}
    for size in [(64, 64), (48, 80), (64, 64)]:
        acts = random_acts(layers, 2, size, seed=size[1])
        for p in (*dense.parameters(), *naive.parameters()):
            p.grad = None
        out_f, out_n = dense(acts, size), naive(acts, size)
        assert out_f.is_contiguous() and out_f.shape == out_n.shape
        assert rel_diff(out_f, out_n) < 1e-10
        w = torch.randn(out_n.shape, dtype=torch.float64)
        (out_f * w).sum().backward()
        (out_n * w).sum().backward()
        for name, p in dense.named_parameters():
            assert rel_diff(p.grad, dict(naive.named_parameters())[name].grad) < 1e-10, (size, name)


def test_conv1_trains_in_the_mlps_units_and_folded_checkpoints_still_load():
    """conv1 holds fc1 in standardised units, so a dense training step is the MLP's step: the gradient that
    reaches conv1 equals the one fc1 gets from the same pixels (were the normaliser folded into conv1,
    Adam's ~lr steps would be lr x std in the MLP's units; real hypercolumn stds reach ~370 and training
    diverged). A head saved with the normaliser folded into conv1 (no mean/std) is the same function."""
    layers = ["input", "conv1_1"]
    c = hypercolumn_channels(layers)
    mlp = random_mlp(c, 16, classes=3)
    with torch.no_grad():  # channel scales as far apart as real hypercolumns
        mlp.std.copy_(torch.logspace(-3, 2.5, c))
        mlp.mean.copy_(torch.linspace(-50, 50, c))
    mlp.eval()
    size = (32, 32)
    acts = {n: a * 100 for n, a in random_acts(layers, 2, size, dtype=torch.float32, seed=7).items()}
    head = DenseHead.from_mlp(mlp, layers, 2).eval()
    assert torch.equal(head.conv1.weight[:, :, 0, 0], mlp.fc1.weight)

    hyper = NaiveHead(layers, 8, 2).hypercolumns(acts, size)
    rows, cols = evaluated_positions(size[0], 2), evaluated_positions(size[1], 2)
    pixels = hyper[:, :, rows][:, :, :, cols].permute(0, 2, 3, 1).reshape(-1, c)  # the grid pixels, in grid order
    weight = torch.randn(pixels.shape[0], 3, generator=torch.Generator().manual_seed(0))
    (mlp(pixels) * weight).sum().backward()
    logits = head(acts, size).permute(0, 2, 3, 1).reshape(-1, 3)
    (logits * weight).sum().backward()
    assert rel_diff(head.conv1.weight.grad[:, :, 0, 0], mlp.fc1.weight.grad) < 1e-4
    assert rel_diff(head.conv1.bias.grad, mlp.fc1.bias.grad) < 1e-4

    folded = {k: v for k, v in head.state_dict().items() if k not in ("mean", "std")}
    w1 = mlp.fc1.weight.double() / mlp.std.double()[None, :]
    folded["conv1.weight"] = w1[:, :, None, None].float()
    folded["conv1.bias"] = (mlp.fc1.bias.double() - w1 @ mlp.mean.double()).float()
    old = DenseHead(layers, 16, 2, num_classes=3).eval()
    old.load_state_dict(folded)
    assert torch.equal(old.std, torch.ones(c)) and torch.equal(old.mean, torch.zeros(c))
    with torch.no_grad():
        assert rel_diff(old(acts, size), head(acts, size)) < 1e-4
