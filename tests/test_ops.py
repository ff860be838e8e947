"""The fused operators against their plain-PyTorch references (realnet/ops.py).

Every case runs on the CPU and, when a GPU is present, on CUDA with every version of the
CUDA kernels (csrc/cuda/v1.cu, v2.cu; float32, plus float16 and bfloat16 there). Ground
truth is always the reference on the same inputs.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from realnet import ops

pytestmark = pytest.mark.skipif(
    not ops.HAS_EXTENSION, reason="the compiled extension is not built"
)

CUDA_VERSIONS = list(ops.CUDA_KERNEL_VERSIONS) if torch.cuda.is_available() else []
DEVICES = ["cpu"] + [f"cuda-v{v}" for v in CUDA_VERSIONS]


@pytest.fixture(params=DEVICES)
def device(request):
    """'cpu', or 'cuda' with one version of the CUDA kernels selected for the test."""
    if request.param == "cpu":
        yield "cpu"
        return
    with ops.cuda_kernel_version(int(request.param.removeprefix("cuda-v"))):
        yield "cuda"


@pytest.fixture(
    params=[f"v{v}" for v in CUDA_VERSIONS]
    or [
        pytest.param(
            "none", marks=pytest.mark.skip(reason="float16/bfloat16 kernels are CUDA-only")
        )
    ]
)
def cuda_version(request):
    """For the CUDA-only tests: each version of the CUDA kernels in turn."""
    with ops.cuda_kernel_version(int(request.param[1:])):
        yield int(request.param[1:])


ATOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 2e-3, torch.bfloat16: 2e-2}

# (batch, [(channels, h, w) per level finest first], k_max, k_mean)
SHAPES = {
    "one_level": (2, [(9, 7, 5)], 3, 4),
    "four_levels_odd": (3, [(5, 13, 11), (7, 7, 6), (6, 4, 3), (3, 1, 2)], 4, 6),
    "paper_like_small": (2, [(16, 32, 32), (32, 16, 16), (32, 8, 8), (16, 4, 4)], 16, 16),
    "batch_one": (1, [(8, 9, 9), (4, 5, 5)], 5, 2),
    "duplicated_picks": (2, [(6, 6, 8), (5, 3, 4)], 9, 8),  # 17 picks of 11 channels
    "max_only": (2, [(6, 5, 5), (4, 3, 3)], 4, 0),
    # the paper's levels and k (batch 2): 16-byte packs, M = 1536 channels to rank
    "paper_levels": (2, [(256, 64, 64), (512, 32, 32), (512, 16, 16), (256, 8, 8)], 256, 256),
}


def make_inputs(batch, levels, device="cpu", dtype=torch.float32, seed=0, requires_grad=True):
    """Features like a backbone's (non-negative) and reconstructions close to them."""
    g = torch.Generator().manual_seed(seed)
    feats, recons = [], []
    for c, h, w in levels:
        f = torch.rand(batch, c, h, w, generator=g, dtype=torch.float64)
        r = f + 0.2 * torch.randn(batch, c, h, w, generator=g, dtype=torch.float64)
        feats.append(f.to(device, dtype).requires_grad_(requires_grad))
        recons.append(r.to(device, dtype).requires_grad_(requires_grad))
    channels = sum(c for c, _, _ in levels)
    running_mean = (0.1 * torch.rand(channels, generator=g)).to(device)
    running_var = (0.5 + torch.rand(channels, generator=g)).to(device)
    return feats, recons, running_mean, running_var


def run_both(feats, recons, k_max, k_mean, running_mean, running_var, training):
    """Fused and reference on the same inputs; each gets its own copy of the running stats."""
    rm_f, rv_f = running_mean.clone(), running_var.clone()
    rm_r, rv_r = running_mean.clone(), running_var.clone()
    fused = ops.rrs_select(feats, recons, k_max, k_mean, rm_f, rv_f, training)
    ref = ops.rrs_select_reference(feats, recons, k_max, k_mean, rm_r, rv_r, training)
    return fused, ref, (rm_f, rv_f), (rm_r, rv_r)


def max_abs(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_rrs_select_matches_reference(shape, training, device):
    batch, levels, k_max, k_mean = SHAPES[shape]
    feats, recons, rm, rv = make_inputs(batch, levels, device)
    (sel, idx), (sel_ref, idx_ref), (rm_f, rv_f), (rm_r, rv_r) = run_both(
        feats, recons, k_max, k_mean, rm, rv, training
    )

    assert sel.shape == (batch, k_max + k_mean, *levels[0][1:]) and sel.dtype == feats[0].dtype
    if batch == 1 and training:
        # One sample is the whole batch: every channel's normalised spatial mean is exactly 0.
        # The mean picks are a tie, which the fused op breaks by channel index and the
        # reference by rounding noise; the max picks are well defined and must agree.
        normalized = torch.nn.functional.batch_norm(
            ops.upsampled_residual(feats, recons).detach(), None, None, training=True
        )
        assert normalized.mean(dim=(2, 3)).abs().max() < 1e-5
        assert idx[0, k_max:].tolist() == list(range(k_mean))
        idx, idx_ref = idx[:, :k_max], idx_ref[:, :k_max]
        sel, sel_ref = sel[:, :k_max], sel_ref[:, :k_max]
    assert torch.equal(idx, idx_ref), "ranked indices differ from the reference"
    assert max_abs(sel, sel_ref) <= ATOL[torch.float32]
    # running statistics: updated exactly as F.batch_norm does in training, untouched in eval
    assert max_abs(rm_f, rm_r) <= 1e-6 and max_abs(rv_f, rv_r) <= 1e-6
    if not training:
        assert torch.equal(rm_f, rm) and torch.equal(rv_f, rv)
    else:
        assert not torch.equal(rm_f, rm)
    if shape == "duplicated_picks":
        assert any(len(set(row.tolist())) < len(row) for row in idx), (
            "the case must contain duplicated picks"
        )

    # gradients through the selection, into recons and feats, duplicated picks summed
    upstream = torch.randn(sel.shape, generator=torch.Generator().manual_seed(1)).to(device)
    grads = torch.autograd.grad(sel, feats + recons, upstream)
    grads_ref = torch.autograd.grad(sel_ref, feats + recons, upstream)
    for g, g_ref in zip(grads, grads_ref):
        # relative to the gradient's size: at the paper's levels an 8x8 source pixel sums
        # ~300 upsampled outputs, in another order than autograd's
        assert max_abs(g, g_ref) <= ATOL[torch.float32] * (1 + g_ref.abs().max().item())


def test_rrs_select_only_recons_require_grad(device):
    """The usual case in training: the frozen backbone's features carry no gradient."""
    feats, recons, rm, rv = make_inputs(2, SHAPES["four_levels_odd"][1], device)
    feats = [f.detach() for f in feats]
    sel, _ = ops.rrs_select(feats, recons, 4, 6, rm.clone(), rv.clone(), True)
    sel_ref, _ = ops.rrs_select_reference(feats, recons, 4, 6, rm.clone(), rv.clone(), True)
    g = torch.autograd.grad(sel.square().sum(), recons)
    g_ref = torch.autograd.grad(sel_ref.square().sum(), recons)
    assert all(max_abs(a, b) <= ATOL[torch.float32] for a, b in zip(g, g_ref))


def test_running_stats_converge_like_batchnorm_over_steps(device):
    """Several training steps then eval: eval ranks with the running statistics."""
    levels = SHAPES["four_levels_odd"][1]
    _, _, rm_f, rv_f = make_inputs(2, levels, device)
    rm_r, rv_r = rm_f.clone(), rv_f.clone()
    for step in range(4):
        feats, recons, _, _ = make_inputs(2, levels, device, seed=10 + step, requires_grad=False)
        a = ops.rrs_select(feats, recons, 4, 6, rm_f, rv_f, True)
        b = ops.rrs_select_reference(feats, recons, 4, 6, rm_r, rv_r, True)
        assert torch.equal(a[1], b[1])
    assert max_abs(rm_f, rm_r) <= 1e-6 and max_abs(rv_f, rv_r) <= 1e-6
    feats, recons, _, _ = make_inputs(3, levels, device, seed=99, requires_grad=False)
    a = ops.rrs_select(feats, recons, 4, 6, rm_f, rv_f, False)
    b = ops.rrs_select_reference(feats, recons, 4, 6, rm_r, rv_r, False)
    assert torch.equal(a[1], b[1]) and max_abs(a[0], b[0]) <= ATOL[torch.float32]


def test_cuda_kernel_version_is_selectable():
    """The benchmark and these tests choose the version of the CUDA kernels at run time."""
    before = ops.cuda_kernels()
    assert before in ops.CUDA_KERNEL_VERSIONS
    other = next(v for v in ops.CUDA_KERNEL_VERSIONS if v != before)
    with ops.cuda_kernel_version(other):
        assert ops.cuda_kernels() == other
    assert ops.cuda_kernels() == before
    with pytest.raises(ValueError, match="version must be"):
        ops.cuda_kernels(len(ops.CUDA_KERNEL_VERSIONS) + 1)
    assert ops.cuda_kernels() == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16/bfloat16 kernels are CUDA-only")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "shape", ["four_levels_odd", "paper_like_small", "duplicated_picks", "paper_levels"]
)
def test_rrs_select_reduced_precision_cuda(shape, dtype, cuda_version):
    batch, levels, k_max, k_mean = SHAPES[shape]
    feats, recons, rm, rv = make_inputs(batch, levels, "cuda", dtype)
    (sel, idx), (sel_ref, idx_ref), (rm_f, rv_f), (rm_r, rv_r) = run_both(
        feats, recons, k_max, k_mean, rm, rv, True
    )
    assert sel.dtype == dtype
    assert torch.equal(idx, idx_ref)
    assert max_abs(sel, sel_ref) <= ATOL[dtype]
    assert max_abs(rm_f, rm_r) <= 1e-5 and max_abs(rv_f, rv_r) <= 1e-5
    upstream = torch.randn(sel.shape, device="cuda").to(dtype)
    grads = torch.autograd.grad(sel, recons, upstream)
    grads_ref = torch.autograd.grad(sel_ref, recons, upstream)
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == dtype
        scale = g_ref.double().abs().max().item() + 1.0
        assert max_abs(g, g_ref) <= ATOL[dtype] * scale * 4


GRADCHECK_SHAPES = {  # small: the full Jacobian is checked, one input element at a time
    "three_levels_odd": (2, [(3, 5, 4), (2, 3, 2), (2, 1, 2)], 4, 5),  # 9 picks of 7: duplicates
    "one_level": (2, [(4, 3, 5)], 2, 3),
}


@pytest.mark.parametrize("shape", list(GRADCHECK_SHAPES))
def test_rrs_gather_gradcheck_float64(shape, device):
    """Finite differences in float64 on the differentiable part (fixed indices: the ranking
    is piecewise constant, so it is held fixed as autograd does)."""
    batch, levels, k_max, k_mean = GRADCHECK_SHAPES[shape]
    feats, recons, rm, rv = make_inputs(batch, levels, device, torch.float64)
    _, indices = ops.rrs_select(feats, recons, k_max, k_mean, rm, rv, True)
    n = len(levels)

    def fn(*tensors):
        return torch.ops.realnet.rrs_gather(list(tensors[:n]), list(tensors[n:]), indices)

    assert torch.autograd.gradcheck(fn, tuple(feats + recons), eps=1e-6, atol=1e-7)


def test_opcheck_all_ops(device):
    feats, recons, rm, rv = make_inputs(2, SHAPES["four_levels_odd"][1], device)
    plain = [t.detach() for t in feats], [t.detach() for t in recons]
    stats = torch.ops.realnet.rrs_stats(*plain)
    spatial = feats[0].shape[-1] * feats[0].shape[-2]
    _, indices = ops.rrs_select(*plain, 4, 6, rm.clone(), rv.clone(), True)
    grad = torch.randn(2, 10, *feats[0].shape[-2:], device=device)
    cases = [
        (torch.ops.realnet.rrs_stats.default, (plain[0], plain[1])),
        (
            torch.ops.realnet.rrs_rank.default,
            (stats, spatial, 4, 6, rm.clone(), rv.clone(), True, 0.9, 1e-5),
        ),
        (
            torch.ops.realnet.rrs_rank.default,
            (stats, spatial, 4, 6, rm.clone(), rv.clone(), False, 0.9, 1e-5),
        ),
        (torch.ops.realnet.rrs_gather.default, (feats, recons, indices)),
        (
            torch.ops.realnet.rrs_gather_backward.default,
            (grad, plain[0], plain[1], indices, True, True),
        ),
        (
            torch.ops.realnet.rrs_gather_backward.default,
            (grad, plain[0], plain[1], indices, False, True),
        ),
    ]
    a, z, mask = afs_inputs(device)
    cases.append((torch.ops.realnet.afs_channel_loss.default, (a, z, mask)))
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_matches_eager():
    feats, recons, rm, rv = make_inputs(2, SHAPES["four_levels_odd"][1], requires_grad=False)
    recons = [r.requires_grad_() for r in recons]

    def step(feats, recons, rm, rv):
        selected, indices = ops.rrs_select(feats, recons, 4, 6, rm, rv, True)
        return selected.square().mean(), indices

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    rm_c, rv_c = rm.clone(), rv.clone()
    loss_c, idx_c = compiled(feats, recons, rm_c, rv_c)
    loss_e, idx_e = step(feats, recons, rm, rv)
    assert torch.equal(idx_c, idx_e) and max_abs(loss_c, loss_e) <= 1e-6
    assert torch.equal(rm_c, rm) and torch.equal(rv_c, rv), (
        "the in-place running-stat update must survive compile"
    )
    g_c = torch.autograd.grad(loss_c, recons)
    g_e = torch.autograd.grad(loss_e, recons)
    assert all(max_abs(a, b) <= 1e-7 for a, b in zip(g_c, g_e))

    a, z, mask = afs_inputs("cpu")
    afs = torch.compile(ops.afs_channel_loss, backend="aot_eager", fullgraph=True)
    assert max_abs(afs(a, z, mask), ops.afs_channel_loss(a, z, mask)) == 0


# ------------------------------------------------------------------------------------------
# afs_channel_loss
# ------------------------------------------------------------------------------------------


def afs_inputs(device, B=3, C=11, h=5, w=7, H=23, W=29, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    normal = torch.rand(B, C, h, w, generator=g)
    anomalous = normal + 0.5 * torch.randn(B, C, h, w, generator=g) * (
        torch.rand(B, C, h, w, generator=g) > 0.5
    )
    mask = (torch.rand(B, 1, H, W, generator=g) > 0.7).float()
    return anomalous.to(device, dtype), normal.to(device, dtype), mask.to(device)


AFS_SHAPES = {  # (B, C, h, w, H, W): mask larger, equal, exactly 2x, odd ratios, a 1x1 map
    "odd": (3, 11, 5, 7, 23, 29),
    "same_size": (2, 6, 8, 8, 8, 8),
    "double": (2, 5, 6, 4, 12, 8),
    "layer3_like": (4, 64, 16, 16, 256, 256),
    "one_pixel": (5, 3, 1, 1, 16, 16),
}


@pytest.mark.parametrize("shape", list(AFS_SHAPES), ids=list(AFS_SHAPES))
def test_afs_channel_loss_matches_reference(shape, device):
    a, z, mask = afs_inputs(device, *AFS_SHAPES[shape])
    loss = ops.afs_channel_loss(a, z, mask)
    ref = ops.afs_channel_loss_reference(a, z, mask)
    assert loss.shape == (a.shape[1],) and loss.dtype == torch.float32
    assert max_abs(loss, ref) <= ATOL[torch.float32]


def test_afs_channel_loss_special_channels(device):
    """A constant channel (range 0: only the 1e-4 keeps it finite), a NaN channel (NaN out,
    as the reference), and a non-binary mask."""
    a, z, mask = afs_inputs(device)
    a[:, 0] = z[:, 0] + 0.3
    a[0, 1, 0, 0] = float("nan")
    mask = mask * 0.5
    loss, ref = ops.afs_channel_loss(a, z, mask), ops.afs_channel_loss_reference(a, z, mask)
    assert torch.isnan(loss[1]) and torch.isnan(ref[1])
    keep = torch.ones_like(loss, dtype=torch.bool)
    keep[1] = False
    assert max_abs(loss[keep], ref[keep]) <= ATOL[torch.float32]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16/bfloat16 kernels are CUDA-only")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_afs_channel_loss_reduced_precision_cuda(dtype, cuda_version):
    a, z, mask = afs_inputs("cuda", *AFS_SHAPES["layer3_like"], dtype=dtype)
    assert (
        max_abs(ops.afs_channel_loss(a, z, mask), ops.afs_channel_loss_reference(a, z, mask))
        <= 1e-5
    )


def test_afs_picks_the_channel_that_carries_the_anomaly():
    """Channels that respond inside the mask score lowest; AFS keeps them."""
    g = torch.Generator().manual_seed(0)
    normal = torch.rand(4, 8, 16, 16, generator=g)
    mask = torch.zeros(4, 1, 64, 64)
    mask[:, :, 16:40, 20:44] = 1
    anomalous = normal + 0.05 * torch.randn(normal.shape, generator=g)
    region = torch.nn.functional.interpolate(mask, size=(16, 16), mode="nearest")
    anomalous[:, [2, 5]] += 3 * region[:, 0:1]
    loss = ops.afs_channel_loss(anomalous, normal, mask)
    assert set(loss.argsort()[:2].tolist()) == {2, 5}


# ------------------------------------------------------------------------------------------
# Bad input: one clear sentence, from the C++ checks
# ------------------------------------------------------------------------------------------


def _rrs(feats, recons, k_max=2, k_mean=2, channels=None, **kw):
    channels = channels if channels is not None else sum(f.shape[1] for f in feats)
    return ops.rrs_select(
        feats, recons, k_max, k_mean, torch.zeros(channels), torch.ones(channels), True, **kw
    )


def test_bad_inputs_rrs():
    f = [torch.rand(2, 4, 8, 8), torch.rand(2, 3, 4, 4)]
    r = [t.clone() for t in f]
    with pytest.raises(RuntimeError, match="4-D"):
        _rrs([f[0][0]], [r[0][0]])
    with pytest.raises(RuntimeError, match="shape"):
        _rrs(f, [r[0], r[1][:, :2]])
    with pytest.raises(RuntimeError, match="levels"):
        _rrs(f, r[:1])
    with pytest.raises(RuntimeError, match="float32 or float64"):
        _rrs([t.long() for t in f], [t.long() for t in r])
    with pytest.raises(RuntimeError, match="CUDA-only"):  # the kernel itself
        torch.ops.realnet.rrs_stats([t.half() for t in f], [t.half() for t in r])
    # rrs_select runs bf16/fp16 on the CPU (autocast) in float32, and mixed reduced dtypes too
    noisy = [t + 0.1 * torch.rand(t.shape) for t in f]
    for low_f, low_r in (
        ([t.bfloat16() for t in f], [t.bfloat16() for t in noisy]),
        (f, [t.half() for t in noisy]),
    ):
        got = _rrs(low_f, low_r)
        expected = _rrs([t.float() for t in low_f], [t.float() for t in low_r])
        assert got[0].dtype == torch.float32
        assert torch.equal(got[1], expected[1]) and torch.equal(got[0], expected[0])
    with pytest.raises(RuntimeError, match="one dtype"):
        _rrs(f, [r[0].double(), r[1]])
    with pytest.raises(RuntimeError, match="larger than the channel count"):
        _rrs(f, r, k_max=8)
    with pytest.raises(RuntimeError, match="larger than the channel count"):
        _rrs(f, r, k_mean=100)
    with pytest.raises(RuntimeError, match="not both 0"):
        _rrs(f, r, k_max=0, k_mean=0)
    with pytest.raises(RuntimeError, match="batch is empty"):
        _rrs([t[:0] for t in f], [t[:0] for t in r])
    with pytest.raises(RuntimeError, match="finest first"):
        _rrs(f[::-1], r[::-1])
    with pytest.raises(RuntimeError, match="batch"):
        _rrs([f[0], f[1][:1]], [r[0], r[1][:1]])
    with pytest.raises(RuntimeError, match=r"running_mean must have shape \(M,\)"):
        _rrs(f, r, channels=5)
    with pytest.raises(RuntimeError, match="more than one value per channel"):
        _rrs([torch.rand(1, 3, 1, 1)], [torch.rand(1, 3, 1, 1)])
    with pytest.raises(RuntimeError, match="indices must lie in"):
        torch.ops.realnet.rrs_gather(f, r, torch.tensor([[0, 7], [1, 2]]))
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.realnet.rrs_gather(f, r, torch.tensor([[0, 1], [1, 2]], dtype=torch.int32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to mix devices")
def test_bad_inputs_devices(cuda_version):
    f = [torch.rand(2, 4, 8, 8)]
    with pytest.raises(RuntimeError, match="one device"):
        _rrs(f, [f[0].cuda()])
    with pytest.raises(RuntimeError, match="one device"):
        ops.afs_channel_loss(f[0], f[0].cuda(), torch.zeros(2, 1, 8, 8))


def test_bad_inputs_afs():
    a, z, mask = afs_inputs("cpu")
    with pytest.raises(RuntimeError, match="4-D"):
        ops.afs_channel_loss(a[0], z[0], mask)
    with pytest.raises(RuntimeError, match="shape"):
        ops.afs_channel_loss(a, z[:, :3], mask)
    with pytest.raises(RuntimeError, match=r"mask must be \(B, 1, H, W\)"):
        ops.afs_channel_loss(a, z, mask[:2])
    with pytest.raises(RuntimeError, match=r"mask must be \(B, 1, H, W\)"):
        ops.afs_channel_loss(a, z, mask.expand(-1, 2, -1, -1))
    with pytest.raises(RuntimeError, match="batch is empty"):
        ops.afs_channel_loss(a[:0], z[:0], mask[:0])
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.afs_channel_loss(a.int(), z.int(), mask)


# ------------------------------------------------------------------------------------------
# DDP: ranking with the statistics of the global batch, as one process would
# ------------------------------------------------------------------------------------------


def _ddp_worker(rank, world, init_file, result_file, use_reference):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    feats, recons, rm, rv = make_inputs(4, SHAPES["four_levels_odd"][1], requires_grad=False)
    local = slice(rank * 2, rank * 2 + 2)
    fn = ops.rrs_select_reference if use_reference else ops.rrs_select
    sel, idx = fn(
        [f[local] for f in feats],
        [r[local] for r in recons],
        4,
        6,
        rm,
        rv,
        True,
        process_group=dist.group.WORLD,
    )
    torch.save(
        {"selected": sel, "indices": idx, "running_mean": rm, "running_var": rv},
        f"{result_file}.{rank}",
    )
    dist.destroy_process_group()


@pytest.mark.parametrize("use_reference", [False, True], ids=["fused", "reference"])
def test_ddp_global_batch_statistics(tmp_path, use_reference):
    import torch.multiprocessing as mp

    mp.spawn(
        _ddp_worker,
        args=(2, str(tmp_path / "init"), str(tmp_path / "out"), use_reference),
        nprocs=2,
    )
    feats, recons, rm, rv = make_inputs(4, SHAPES["four_levels_odd"][1], requires_grad=False)
    sel, idx = ops.rrs_select_reference(feats, recons, 4, 6, rm, rv, True)
    for rank in range(2):
        part = torch.load(tmp_path / f"out.{rank}")
        local = slice(rank * 2, rank * 2 + 2)
        assert torch.equal(part["indices"], idx[local])
        assert max_abs(part["selected"], sel[local]) <= ATOL[torch.float32]
        assert (
            max_abs(part["running_mean"], rm) <= 1e-6 and max_abs(part["running_var"], rv) <= 1e-6
        )


# ------------------------------------------------------------------------------------------
# Without the extension: the reference, with one warning
# ------------------------------------------------------------------------------------------


def test_fallback_without_extension_warns_once(tmp_path):
    script = textwrap.dedent("""
        import sys, warnings, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "realnet._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch
            from realnet import ops
            feats = [torch.rand(2, 4, 8, 8), torch.rand(2, 3, 4, 4)]
            recons = [f + 0.1 for f in feats]
            sel, idx = ops.rrs_select(feats, recons, 2, 3, torch.zeros(7), torch.ones(7), True)
            ref, idx_ref = ops.rrs_select_reference(
                feats, recons, 2, 3, torch.zeros(7), torch.ones(7), True
            )
            loss = ops.afs_channel_loss(feats[0], recons[0], torch.zeros(2, 1, 16, 16))
        mine = [w for w in caught if "realnet" in str(w.message)]
        assert not ops.HAS_EXTENSION
        assert len(mine) == 1, [str(w.message) for w in mine]
        assert "fall back" in str(mine[0].message)
        assert torch.equal(sel, ref) and torch.equal(idx, idx_ref) and loss.shape == (4,)
        print("ok")
    """)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
