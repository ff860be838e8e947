"""The two fused operators of RealNet and their plain-PyTorch references.

    rrs_select(feats, recons, k_max, k_mean, running_mean, running_var, training,
               momentum=0.9, eps=1e-5) -> (selected, indices)
    afs_channel_loss(anomalous, normal, mask) -> per-channel loss (C,)

The `*_reference` functions say what the operators compute in the most direct PyTorch;
the tests hold the fused C++/CUDA kernels (csrc/) to them. When the compiled extension
`realnet._C` is missing, the public functions fall back to the references (one warning).

How the fused RRS works (docs/method.md, section 6). The reference materialises the
upsampled residual E (B, M, H, W), its BatchNorm-normalised copy, and the gather. The fused
path never builds either:
  1. `rrs_stats` makes one pass over feats/recons and returns, per sample and channel,
     the spatial max, mean and (biased) variance of the upsampled squared residual.
  2. `rrs_rank` turns those (B, M) numbers into BatchNorm statistics, updates the
     running statistics in place, and ranks. BatchNorm is an increasing affine map per
     channel, so the spatial max (mean) of the normalised residual is the normalised
     spatial max (mean): the ranking needs only (B, M) numbers, never a (B, M, H, W) map.
  3. `rrs_gather` recomputes the residual of the selected channels only, straight into
     the output; its backward scatters the gradient (duplicated picks summed) through
     the bilinear upsampling into feats and recons.
Under DDP (`process_group=...`) the (B, M) statistics are all-gathered between steps 1
and 2, so every rank ranks with the statistics of the global batch, as one process would.
"""

import contextlib
import os
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.realnet.*)

    HAS_EXTENSION = True
except ImportError as _error:  # not built: the reference still computes the same thing
    HAS_EXTENSION = False
    warnings.warn(
        f"realnet: the compiled extension realnet._C is not available ({_error}); "
        "rrs_select and afs_channel_loss fall back to the plain-PyTorch references. "
        "Build it with: pip install --no-build-isolation -e .",
        stacklevel=2,
    )

AFS_EPS = 1e-4  # added to the min-max range in AFS, as the authors do

# The CUDA kernels come in versions kept side by side (csrc/cuda/v1.cu, v2.cu; each file's
# header says what it changes and whether it has run on a GPU). The default is the newest
# that has passed the parity tests on a GPU; REALNET_CUDA_KERNELS=N at import selects another.
CUDA_KERNEL_VERSIONS = (1, 2)
if os.environ.get("REALNET_CUDA_KERNELS", "") not in ("",) + tuple(
    str(v) for v in CUDA_KERNEL_VERSIONS
):
    raise ValueError(
        f"REALNET_CUDA_KERNELS={os.environ['REALNET_CUDA_KERNELS']!r}: expected one of "
        f"{', '.join(map(str, CUDA_KERNEL_VERSIONS))} (the versions in csrc/cuda/)"
    )


def cuda_kernels(version=None):
    """The version of the CUDA kernels the fused ops run; with `version`, select it.
    Returns the version in use before the call. (The CPU kernels have one version.)"""
    if not HAS_EXTENSION:
        return None
    return _C.cuda_kernels() if version is None else _C.cuda_kernels(int(version))


@contextlib.contextmanager
def cuda_kernel_version(version):
    """Run the block with another version of the CUDA kernels (benchmarks, parity tests)."""
    previous = cuda_kernels(version)
    try:
        yield
    finally:
        cuda_kernels(previous)


# ----------------------------------------------------------------------------------------
# References: the ground truth, in plain PyTorch
# ----------------------------------------------------------------------------------------


def upsampled_residual(feats, recons):
    """E = concat_k upsample((feats_k - recons_k)^2) at the size of the first (finest) level."""
    size = feats[0].shape[-2:]
    residuals = []
    for f, r in zip(feats, recons):
        e = (f.float() - r.float()) ** 2
        if e.shape[-2:] != size:
            e = F.interpolate(e, size=size, mode="bilinear", align_corners=True)
        residuals.append(e)
    return torch.cat(residuals, dim=1)


def _rank(scores, k):
    """Top-k channel indices per row, best first; ties go to the lower channel index."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]


def _gather_global_batch(x, process_group):
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(parts, x.contiguous(), group=process_group)
    return torch.cat(parts, dim=0), dist.get_rank(process_group) * x.shape[0]


def rrs_select_reference(
    feats,
    recons,
    k_max,
    k_mean,
    running_mean,
    running_var,
    training,
    momentum=0.9,
    eps=1e-5,
    *,
    process_group=None,
):
    residual = upsampled_residual(feats, recons)
    ranking = residual.detach()
    start = 0
    if process_group is not None and training:
        ranking, start = _gather_global_batch(ranking, process_group)
    # BatchNorm without affine, only to make channels from different levels comparable
    normalized = F.batch_norm(
        ranking, running_mean, running_var, None, None, training, momentum, eps
    )
    indices = torch.cat(
        [_rank(normalized.amax(dim=(2, 3)), k_max), _rank(normalized.mean(dim=(2, 3)), k_mean)],
        dim=1,
    )
    indices = indices[start : start + residual.shape[0]]
    # gather from the raw (not normalised) residual, in rank order
    selected = residual.gather(1, indices[:, :, None, None].expand(-1, -1, *residual.shape[-2:]))
    return selected.to(feats[0].dtype), indices


def afs_channel_loss_reference(anomalous, normal, mask):
    """Paper eq. 4 for one batch: per channel, MSE between the min-max normalised squared
    feature difference and the mask resized (nearest) to the feature map. Returns (C,)."""
    d = (anomalous.float() - normal.float()) ** 2
    B, C, h, w = d.shape
    d = d.transpose(0, 1).reshape(C, B * h * w)
    low, high = d.amin(dim=1, keepdim=True), d.amax(dim=1, keepdim=True)
    d = (d - low) / (high - low + AFS_EPS)
    label = F.interpolate(mask.float(), size=(h, w), mode="nearest").reshape(1, B * h * w)
    return ((d - label) ** 2).mean(dim=1)


# ----------------------------------------------------------------------------------------
# Fused operators (torch.ops.realnet.*, see csrc/)
# ----------------------------------------------------------------------------------------


def rrs_select(
    feats,
    recons,
    k_max,
    k_mean,
    running_mean,
    running_var,
    training,
    momentum=0.9,
    eps=1e-5,
    *,
    process_group=None,
):
    """Reconstruction Residual Selection (paper §3.3).

    feats, recons: lists of (B, m_k, h_k, w_k), finest level first.
    running_mean, running_var: (M,) float32, M = sum m_k; updated in place when training.
    Returns selected (B, k_max + k_mean, H, W) gathered from the raw upsampled residual,
    and indices (B, k_max + k_mean) int64: the k_max channels with the largest spatial
    max of the normalised residual, then the k_mean with the largest spatial mean.
    process_group: under DDP, rank with the batch statistics of the global batch.
    Ties are broken by the lower channel index. (With a batch of one in training, every
    channel's normalised spatial mean is exactly 0, so the mean picks are such a tie.)
    """
    if not HAS_EXTENSION:
        return rrs_select_reference(
            feats,
            recons,
            k_max,
            k_mean,
            running_mean,
            running_var,
            training,
            momentum,
            eps,
            process_group=process_group,
        )
    feats, recons = list(feats), list(recons)
    dtypes = {t.dtype for t in feats + recons}
    if dtypes & {torch.bfloat16, torch.float16} and (
        len(dtypes) > 1 or feats[0].device.type == "cpu"
    ):
        # Under autocast the features (backbone) and the reconstructions (UNets) can differ in
        # dtype, and the CPU kernels take float32/float64 only (the CUDA ones also bf16/fp16):
        # RRS then runs in float32, which the small residual differences deserve anyway.
        feats, recons = [f.float() for f in feats], [r.float() for r in recons]
    stats = torch.ops.realnet.rrs_stats(feats, recons)
    start, batch = 0, feats[0].shape[0]
    if process_group is not None and training:
        stats_t, start = _gather_global_batch(stats.transpose(0, 1), process_group)
        stats = stats_t.transpose(0, 1)
    spatial = feats[0].shape[-1] * feats[0].shape[-2]
    indices = torch.ops.realnet.rrs_rank(
        stats, spatial, k_max, k_mean, running_mean, running_var, training, momentum, eps
    )
    indices = indices[start : start + batch]
    return torch.ops.realnet.rrs_gather(feats, recons, indices), indices


def afs_channel_loss(anomalous, normal, mask):
    """Per-channel AFS loss of one batch, (C,) float32. Not differentiable (AFS runs once,
    under no_grad, to choose channels)."""
    if not HAS_EXTENSION:
        return afs_channel_loss_reference(anomalous, normal, mask)
    return torch.ops.realnet.afs_channel_loss(anomalous, normal, mask)


if HAS_EXTENSION:
    # Fake (meta) kernels: output shapes without computing, for torch.compile / export.
    @torch.library.register_fake("realnet::rrs_stats")
    def _(feats, recons):
        channels = sum(f.shape[1] for f in feats)
        return feats[0].new_empty((3, feats[0].shape[0], channels), dtype=torch.float64)

    @torch.library.register_fake("realnet::rrs_rank")
    def _(stats, spatial, k_max, k_mean, running_mean, running_var, training, momentum, eps):
        torch._check(k_max + k_mean > 0)
        return stats.new_empty((stats.shape[1], k_max + k_mean), dtype=torch.int64)

    @torch.library.register_fake("realnet::rrs_gather")
    def _(feats, recons, indices):
        return feats[0].new_empty((indices.shape[0], indices.shape[1], *feats[0].shape[-2:]))

    @torch.library.register_fake("realnet::rrs_gather_backward")
    def _(grad, feats, recons, indices, need_feats, need_recons):
        return (
            [torch.empty_like(f) for f in feats] if need_feats else [],
            [torch.empty_like(r) for r in recons] if need_recons else [],
        )

    @torch.library.register_fake("realnet::afs_channel_loss")
    def _(anomalous, normal, mask):
        return anomalous.new_empty((anomalous.shape[1],), dtype=torch.float32)

    # Autograd: selected = E[indices] with E = upsample((feats - recons)^2).
    def _gather_setup_context(ctx, inputs, output):
        feats, recons, indices = inputs
        ctx.save_for_backward(indices, *feats, *recons)
        ctx.levels = len(feats)

    def _gather_backward(ctx, grad):
        indices, *tensors = ctx.saved_tensors
        feats, recons = tensors[: ctx.levels], tensors[ctx.levels :]
        # for a Tensor[] input, needs_input_grad holds one flag per tensor
        need_feats, need_recons = any(ctx.needs_input_grad[0]), any(ctx.needs_input_grad[1])
        grad_feats, grad_recons = torch.ops.realnet.rrs_gather_backward(
            grad.contiguous(), list(feats), list(recons), indices, need_feats, need_recons
        )
        none = [None] * ctx.levels
        return (grad_feats if need_feats else none), (grad_recons if need_recons else none), None

    torch.library.register_autograd(
        "realnet::rrs_gather", _gather_backward, setup_context=_gather_setup_context
    )
