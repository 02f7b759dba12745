"""Forward of the fused modulated deformable convolution in Triton: an implicit GEMM that samples
while it multiplies, so the (C * kh * kw, N * Ho * Wo) column buffer of the column path is never
written.

Shape shorthand: N batch, C input channels, H x W input, O output channels, G conv groups
(cg = C / G input and og = O / G output channels per group), DG deformable groups (cd = C / DG
channels each), kh x kw kernel, K = kh * kw taps (row-major), Ho x Wo output, M = N * Ho * Wo
output pixels. offset is (N, DG * K * 2, Ho, Wo) as [group][tap][dy, dx]; mask is
(N, DG * K, Ho, Wo).

One program computes a (pixels x output channels) tile of one conv group,
out[m, o] = bias[o] + sum over (k, c) of mask[d(c), k, m] * sample(input[n(m), c], k, m) *
weight[o, c, k], with BLOCK_N covering the group's output channels up to 256 (so each sampled tile
is gathered once for all of them):

* the input is read channels-last (N, H, W, C with channel stride 1): each bilinear corner of a
  pixel is a row of BLOCK_K adjacent channels, which the compiler loads as 16-byte vectors (8 half
  or 4 float channels) when C is a multiple of 8 (Triton specialises sizes and strides divisible
  by 16);
* one flat loop over (tap, chunk of BLOCK_K channels), which Triton software-pipelines
  (``tl.range``, ``num_stages``). Each step reads the tile's offsets and mask for its tap and
  deformable group, places the bilinear cell of every pixel once (``common.py``) and applies those
  weights to all the chunk's channels (a chunk never crosses a deformable group's border: the
  group's channels are cut into segments, one per deformable group they meet, then into chunks);
* the blended, masked (pixels x channels) tile stays in registers as the A operand of
  ``tl.dot`` with the packed weight tile (G, K, cg, og) as B, accumulating in float32;
* when the (pixel tile, conv group, output tile) grid is smaller than about two waves of the GPU's
  streaming multiprocessors, the K loop is split over a second grid axis (``split_k``): each part
  writes float32 partial sums and ``_split_sum_kernel`` adds them in a fixed order (deterministic);
* bias in the epilogue (of part 0), output written once, NCHW, in the input's dtype.

float16, bfloat16 and float32 (TF32 products when ``torch.backends.cudnn.allow_tf32`` is set, as
``F.conv2d``; ``dot_precision``); float64 stays on the column path. Index arithmetic is int32: the
dispatcher sends tensors whose element offsets pass 2**31 - 1 to the column path
(``projects_dcnv2.ops.triton_kernels.unsupported_reason``).
"""

import functools

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

from . import INT32_MAX, dot_precision
from .common import dcn_cell, dcn_corner, tap_position

__all__ = ["mdconv_forward", "forward_plan", "launch_spec", "INTERPRETED", "INTERPRETER_BLOCKS"]

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _corner(x_ptr, x_pix, chan, y0, x0, ly, lx, inside, nan, H, W, xs_h, xs_w, live,
            DY: tl.constexpr, DX: tl.constexpr):  # fmt: skip
    """One bilinear corner's weighted values, (BLOCK_M, BLOCK_K): a row of adjacent channels per
    pixel (channel stride 1), its position and weight computed once per pixel."""
    yn, xn, valid, w, wy, wx = dcn_corner(y0, x0, ly, lx, inside, nan, H, W, DY, DX)
    row = x_pix + yn * xs_h + xn * xs_w
    v = tl.load(x_ptr + row[:, None] + chan[None, :], mask=valid[:, None] & live, other=0.0)
    return w[:, None] * v.to(tl.float32)


@triton.jit
def _mdconv_forward_kernel(
    x_ptr, off_ptr, mask_ptr, w_ptr, bias_ptr, out_ptr,
    M, H, W, Ho, Wo, G, cg, og, cd,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    xs_n, xs_h, xs_w, os_n, os_c, os_h, os_w, ms_n, ms_c, ms_h, ms_w,
    ys_s, ys_n, ys_c,
    HAS_BIAS: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_M pixels x BLOCK_N output channels) tile, part ``program_id(1)`` of
    ``num_programs(1)`` of its K loop. Grid: (cdiv(M, BLOCK_M) * G * cdiv(og, BLOCK_N), split_k),
    the output tiles of a pixel tile next to each other. x is channels-last with channel stride 1;
    w is packed (G, K, cg, og) contiguous; out is (split_k, N, O, Ho * Wo) contiguous (split_k 1:
    the output itself). Software-pipelined with the launch's ``num_stages``."""
    n_tiles = tl.cdiv(og, BLOCK_N)
    pid = tl.program_id(0)
    part = tl.program_id(1)
    m_tile = pid // (G * n_tiles)
    g = (pid // n_tiles) % G
    o = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)  # within the group
    o_in = o < og
    m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_in = m < M
    P = Ho * Wo
    n = m // P
    p = m % P
    ho = p // Wo
    wo = p % Wo
    x_pix = n * xs_n  # each pixel's image
    off_pix = n * os_n + ho * os_h + wo * os_w
    mask_pix = n * ms_n + ho * ms_h + wo * ms_w
    c_group = g * cg  # the group's first input channel
    w_group = w_ptr + g * (KH * KW) * cg * og
    # The flat K loop. The group's channels fall into segments, one per deformable group that
    # meets them, of at most min(cg, cd) channels; each segment into ``per_seg`` chunks of BLOCK_K
    # (the last partial or empty). Step t: tap t // (segs * per_seg), then segment, then chunk.
    d_first = c_group // cd
    segs = (c_group + cg - 1) // cd - d_first + 1
    per_seg = tl.cdiv(tl.minimum(cg, cd), BLOCK_K)
    per_tap = segs * per_seg
    steps = KH * KW * per_tap
    per_part = tl.cdiv(steps, tl.num_programs(1))
    t_begin = part * per_part
    t_end = tl.minimum(t_begin + per_part, steps)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in tl.range(t_begin, t_end):
        k = t // per_tap
        r = t - k * per_tap
        d = d_first + r // per_seg  # the chunk's deformable group
        seg_begin = tl.maximum(c_group, d * cd)
        seg_end = tl.minimum(c_group + cg, d * cd + cd)
        c = seg_begin + (r % per_seg) * BLOCK_K + tl.arange(0, BLOCK_K)  # input channels
        c_in = c < seg_end
        i = k // KW
        j = k - i * KW
        # the tap's cell and mask, once per pixel for all the chunk's channels
        dk = d * (KH * KW) + k
        dy = tl.load(off_ptr + off_pix + (2 * dk) * os_c, mask=m_in, other=0.0)
        dx = tl.load(off_ptr + off_pix + (2 * dk + 1) * os_c, mask=m_in, other=0.0)
        mk = tl.load(mask_ptr + mask_pix + dk * ms_c, mask=m_in, other=0.0).to(tl.float32)
        y, x = tap_position(ho, wo, i, j, dy, dx, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w)
        y0, x0, ly, lx, inside, nan = dcn_cell(y, x, H, W)
        live = m_in[:, None] & c_in[None, :]
        v = _corner(x_ptr, x_pix, c, y0, x0, ly, lx, inside, nan, H, W, xs_h, xs_w, live, 0, 0)
        v += _corner(x_ptr, x_pix, c, y0, x0, ly, lx, inside, nan, H, W, xs_h, xs_w, live, 0, 1)
        v += _corner(x_ptr, x_pix, c, y0, x0, ly, lx, inside, nan, H, W, xs_h, xs_w, live, 1, 0)
        v += _corner(x_ptr, x_pix, c, y0, x0, ly, lx, inside, nan, H, W, xs_h, xs_w, live, 1, 1)
        # channels past the segment's end must be 0, not NaN * 0: they meet a weight of 0
        col = tl.where(c_in[None, :], v * mk[:, None], 0.0)
        w_rows = w_group + (k * cg + c - c_group) * og
        wt = tl.load(w_rows[:, None] + o[None, :], mask=c_in[:, None] & o_in[None, :], other=0.0)
        acc = tl.dot(col.to(DOT_DTYPE), wt.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:  # once: in part 0
        b = tl.load(bias_ptr + g * og + o, mask=o_in & (part == 0), other=0.0)
        acc += b.to(tl.float32)[None, :]
    out = out_ptr + part * ys_s + (n * ys_n + p)[:, None] + ((g * og + o) * ys_c)[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_in[:, None] & o_in[None, :])


@triton.jit
def _split_sum_kernel(part_ptr, out_ptr, numel, parts, BLOCK: tl.constexpr):
    """out = the sum of the ``parts`` float32 partial outputs (parts, numel), in part order."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = i < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(parts):
        acc += tl.load(part_ptr + s * numel + i, mask=live, other=0.0)
    tl.store(out_ptr + i, acc.to(out_ptr.dtype.element_ty), mask=live)


_SPLIT_BLOCK = 1024

# The config table: (largest og, BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), the first row whose og
# bound holds; 2-byte dtypes and float32 apart. BLOCK_N covers the group's output channels up to
# 256 (the sampled tile is then gathered once); tl.dot needs every side >= 16.
_TABLE = {
    2: [
        (16, 128, 16, 32, 4, 3),
        (32, 128, 32, 32, 4, 3),
        (64, 128, 64, 32, 4, 3),
        (128, 64, 128, 32, 4, 3),
        (None, 64, 256, 32, 8, 3),
    ],
    4: [
        (16, 64, 16, 16, 4, 3),
        (32, 64, 32, 16, 4, 3),
        (64, 64, 64, 16, 4, 3),
        (128, 64, 128, 16, 4, 3),
        (None, 64, 256, 16, 8, 3),
    ],
}
WAVES = 2
"""Split K until the grid holds about this many programs per streaming multiprocessor."""
MIN_STEPS_PER_PART = 8
"""Fewest (tap, chunk) steps a part of a split K loop keeps, so that its pipeline still fills."""
MAX_SPLIT = 16


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def _steps(cg, cd, groups, kh, kw, block_k):
    """The most (tap, chunk) steps of a conv group's K loop, as the kernel cuts it."""
    segs = max((g * cg + cg - 1) // cd - (g * cg) // cd + 1 for g in range(min(groups, 2 * cd)))
    return kh * kw * segs * triton.cdiv(min(cg, cd), block_k)


def forward_plan(M, cg, og, cd, groups, kh, kw, itemsize, sms, out_numel=0):
    """The launch for a shape: dict of BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, split_k
    and grid. ``sms``: the GPU's streaming multiprocessors. split_k > 1 when the tile grid is
    smaller than about ``WAVES`` programs per multiprocessor, while each part keeps at least
    ``MIN_STEPS_PER_PART`` steps and the partial sums (split_k * out_numel) stay in int32 range."""
    rows = _TABLE[2 if itemsize <= 2 else 4]
    _, bm, bn, bk, warps, stages = next(r for r in rows if r[0] is None or og <= r[0])
    tiles = triton.cdiv(M, bm) * groups * triton.cdiv(og, bn)
    steps = _steps(cg, cd, groups, kh, kw, bk)
    split = max(1, round(WAVES * sms / tiles))
    split = min(split, MAX_SPLIT, max(1, steps // MIN_STEPS_PER_PART))
    if out_numel:
        split = max(1, min(split, (INT32_MAX + 1) // out_numel))
    split = min(split, triton.cdiv(steps, triton.cdiv(steps, split)))  # no empty part
    return dict(
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages, split_k=split,
        grid=(tiles, split),
    )  # fmt: skip


_mdconv_forward_tuned = _mdconv_forward_kernel
"""The kernel the CUDA path launches (with the config table's tiles; no autotuning)."""
INTERPRETED: bool = not isinstance(_mdconv_forward_kernel, triton.runtime.JITFunction)
"""Whether the kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1`` when this module was
imported): then it takes CPU tensors, with the fixed tiles of ``INTERPRETER_BLOCKS``."""
INTERPRETER_BLOCKS = {"BLOCK_N": 16, "BLOCK_M": 32, "BLOCK_K": 16}
"""Tiles in the interpreter (optionally "SPLIT_K": parts of the K loop, default 1); tests change
them to leave partial tiles in every dimension and to split K."""


def _device_of(input):
    if INTERPRETED:
        if input.device.type != "cpu":
            raise RuntimeError(
                "dcnv2._triton_modulated_deform_conv2d: input: the kernels were defined with "
                f"TRITON_INTERPRET=1 and take CPU tensors, got one on {input.device}"
            )
    elif input.device.type != "cuda":
        raise RuntimeError(
            "dcnv2._triton_modulated_deform_conv2d: input: expected a CUDA tensor, or CPU tensors "
            "with TRITON_INTERPRET=1 set before the first call; got one on " + str(input.device)
        )


def channels_last_input(input):
    """``input`` with channel stride 1, as the kernel reads it: itself when its channels are
    already adjacent (a ``torch.channels_last`` tensor), else a channels-last copy (one read and
    one write of the input)."""
    if input.stride(1) == 1:
        return input
    return input.contiguous(memory_format=torch.channels_last)


def launch_spec(
    input, offset, mask, weight, bias, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups, dg,
    out, sms,
):  # fmt: skip
    """The forward kernel's launch for these arguments: (args, meta, grid), meta holding the
    constexprs, num_warps and num_stages. ``out``: the (N, O, Ho, Wo) contiguous output (args[5] is
    it, or the float32 partial sums when grid[1] > 1); ``sms``: the GPU's streaming
    multiprocessors, None for the interpreter's ``INTERPRETER_BLOCKS``. Works on meta tensors (the
    compiler checks of tests/test_triton_static.py build the real launch from it)."""
    N, C, H, W = input.shape
    out_channels, cg, kh, kw = weight.shape
    Ho, Wo = offset.shape[2:]
    og, cd, M = out_channels // groups, C // dg, N * Ho * Wo
    dtype = input.dtype
    if sms is None:
        plan = dict(INTERPRETER_BLOCKS)
        split = plan.pop("SPLIT_K", 1)
        tiles = triton.cdiv(M, plan["BLOCK_M"]) * groups * triton.cdiv(og, plan["BLOCK_N"])
        launch = plan
    else:
        plan = forward_plan(M, cg, og, cd, groups, kh, kw, input.element_size(), sms, out.numel())
        split, (tiles, _) = plan["split_k"], plan["grid"]
        launch = {k: plan[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")}
    x = channels_last_input(input)
    # weight packed (G, kh * kw, cg, og): a chunk's rows of B, its output channels adjacent
    packed = weight.reshape(groups, og, cg, kh * kw).permute(0, 3, 2, 1).contiguous()
    dot_dtype = _TL_DTYPES[dtype]
    if INTERPRETED and dtype == torch.bfloat16:
        dot_dtype = tl.float32  # the interpreter's tl.dot mishandles bfloat16; exact in float32
    target = out if split == 1 else out.new_empty((split, *out.shape), dtype=torch.float32)
    args = (
        x, offset, mask, packed, bias if bias is not None else packed, target,
        M, H, W, Ho, Wo, groups, cg, og, cd, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        x.stride(0), x.stride(2), x.stride(3), *offset.stride(), *mask.stride(),
        out.numel(), out.stride(0), out.stride(1),
    )  # fmt: skip
    meta = dict(
        HAS_BIAS=bias is not None,
        KH=kh,
        KW=kw,
        DOT_DTYPE=dot_dtype,
        DOT_PRECISION=dot_precision(dtype),
        **launch,
    )
    return args, meta, (tiles, split)


def mdconv_forward(
    input, offset, mask, weight, bias, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups, dg
):
    """``dcnv2::modulated_deform_conv2d`` by the fused kernel (arguments already checked).

    Args:
        input: (N, C, H, W); offset (N, 2 * dg * K, Ho, Wo); mask (N, dg * K, Ho, Wo);
            weight (O, C / groups, kh, kw); bias (O,) or None. float16, bfloat16 or float32, all of
            one dtype and device (CUDA, or CPU under ``TRITON_INTERPRET=1``); any strides. An input
            whose channel stride is not 1 (NCHW) is copied to channels-last first.
        stride_h, ..., dg: as the op.
    Returns:
        (N, O, Ho, Wo), contiguous, in the input's dtype.
    """
    N, C, H, W = input.shape
    out_channels, cg, kh, kw = weight.shape
    Ho, Wo = offset.shape[2:]
    out = input.new_empty((N, out_channels, Ho, Wo))
    if N == 0 or out_channels == 0 or Ho * Wo == 0:
        return out
    if C == 0 or H == 0 or W == 0:  # nothing to sample: the bias, or zeros
        out.zero_()
        if bias is not None:
            out += bias.view(1, -1, 1, 1)
        return out
    _device_of(input)
    sms = None if INTERPRETED else _sm_count(input.device.index)
    args, meta, grid = launch_spec(
        input, offset, mask, weight, bias, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        groups, dg, out, sms,
    )  # fmt: skip
    target, split = args[5], grid[1]
    sum_grid = (triton.cdiv(out.numel(), _SPLIT_BLOCK),)
    if INTERPRETED:
        if not is_fake(input):  # the interpreter would read fake tensors' missing data
            _mdconv_forward_kernel[grid](*args, **meta)
            if split > 1:
                _split_sum_kernel[sum_grid](target, out, out.numel(), split, BLOCK=_SPLIT_BLOCK)
    else:
        with torch.cuda.device(input.device):
            wrap_triton(_mdconv_forward_tuned)[grid](*args, **meta)
            if split > 1:
                wrap_triton(_split_sum_kernel)[sum_grid](
                    target, out, out.numel(), split, BLOCK=_SPLIT_BLOCK
                )
    return out
