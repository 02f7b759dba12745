"""Forward of the fused modulated deformable convolution in Triton: an implicit GEMM that samples
while it multiplies, so the (C * kh * kw, N * Ho * Wo) column buffer of the column path is never
written.

Shape shorthand: N batch, C input channels, H x W input, O output channels, G conv groups
(cg = C / G input and og = O / G output channels per group), DG deformable groups (cd = C / DG
channels each), kh x kw kernel, K = kh * kw taps (row-major), Ho x Wo output, M = N * Ho * Wo
output pixels. offset is (N, DG * K * 2, Ho, Wo) as [group][tap][dy, dx]; mask is
(N, DG * K, Ho, Wo).

One program computes an (output channels x pixels) tile of one conv group, out[o, m] =
bias[o] + sum over (c, k) of weight[o, c, k] * mask[d(c), k, m] * sample(input[n(m), c], k, m):

* for each tap k, and each deformable group d that meets the conv group's channels, it reads the
  tile's offsets and mask once and places the bilinear cell of every pixel (``common.py``);
* for each chunk of the channels of d within the group it gathers the four corners of that cell for
  the chunk's channels, blends them and scales by the mask (a (channels x pixels) column tile that
  lives only in registers), and multiplies the weight tile with it on the tensor cores (``tl.dot``),
  accumulating in float32;
* it adds the bias and writes the tile once, in the input's dtype.

float16, bfloat16 and float32 (TF32 products when ``torch.backends.cudnn.allow_tf32`` is set, as
``F.conv2d``; ``dot_precision``); float64 is not supported here and stays on the column path. Index
arithmetic is int32: the dispatcher sends tensors whose element offsets pass 2**31 - 1 to the column
path (``projects_dcnv2.triton_kernels.unsupported_reason``).
"""

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

from . import dot_precision
from .common import dcn_cell, dcn_corner, tap_position

__all__ = ["mdconv_forward", "INTERPRETED", "INTERPRETER_BLOCKS"]

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _corner(x_pix, chan, chan_in, y0, x0, ly, lx, inside, nan, H, W, xs_h, xs_w,
            DY: tl.constexpr, DX: tl.constexpr):  # fmt: skip
    """One corner's weighted contribution to a (channels x pixels) column tile."""
    yn, xn, valid, w, wy, wx = dcn_corner(y0, x0, ly, lx, inside, nan, H, W, DY, DX)
    v = tl.load(
        x_pix[None, :] + chan[:, None] + (yn * xs_h + xn * xs_w)[None, :],
        mask=chan_in[:, None] & valid[None, :],
        other=0.0,
    ).to(tl.float32)
    return w[None, :] * v


@triton.jit
def _mdconv_forward_kernel(
    x_ptr, off_ptr, mask_ptr, w_ptr, bias_ptr, out_ptr,
    M, H, W, Ho, Wo, G, cg, og, cd,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    xs_n, xs_c, xs_h, xs_w, os_n, os_c, os_h, os_w, ms_n, ms_c, ms_h, ms_w,
    ws_o, ws_c, ws_h, ws_w, ys_n, ys_c, ys_h, ys_w,
    HAS_BIAS: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """out tile (BLOCK_N output channels x BLOCK_M pixels); a 1-D grid of
    cdiv(M, BLOCK_M) * G * cdiv(og, BLOCK_N) programs, the channel tiles of a pixel tile next to each
    other, so that they find its gathered input in the cache."""
    n_tiles = tl.cdiv(og, BLOCK_N)
    pid = tl.program_id(0)
    m_tile = pid // (G * n_tiles)
    g = (pid % (G * n_tiles)) // n_tiles
    o = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)  # within the group
    o_in = o < og
    m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_in = m < M
    P = Ho * Wo
    n = m // P
    p = m % P
    ho = p // Wo
    wo = p % Wo
    x_pix = x_ptr + n * xs_n  # (BLOCK_M,) pointers to each pixel's image
    off_pix = n * os_n + ho * os_h + wo * os_w
    mask_pix = n * ms_n + ho * ms_h + wo * ms_w
    w_rows = w_ptr + (g * og + o) * ws_o  # (BLOCK_N,)
    c_group = g * cg  # the group's first input channel
    d_first = c_group // cd  # deformable groups that meet the group's channels
    d_last = (c_group + cg - 1) // cd
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k in range(KH * KW):
        i = k // KW
        j = k % KW
        for d in range(d_first, d_last + 1):
            dk = d * KH * KW + k
            dy = tl.load(off_ptr + off_pix + (2 * dk) * os_c, mask=m_in, other=0.0)
            dx = tl.load(off_ptr + off_pix + (2 * dk + 1) * os_c, mask=m_in, other=0.0)
            mk = tl.load(mask_ptr + mask_pix + dk * ms_c, mask=m_in, other=0.0).to(tl.float32)
            y, x = tap_position(
                ho, wo, i, j, dy, dx, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w
            )
            y0, x0, ly, lx, inside, nan = dcn_cell(y, x, H, W)
            c_begin = tl.maximum(c_group, d * cd)
            c_end = tl.minimum(c_group + cg, d * cd + cd)
            for c0 in range(c_begin, c_end, BLOCK_K):
                c = c0 + tl.arange(0, BLOCK_K)
                c_in = c < c_end
                chan = c * xs_c
                v = _corner(x_pix, chan, c_in, y0, x0, ly, lx, inside, nan, H, W, xs_h, xs_w, 0, 0)
                v += _corner(x_pix, chan, c_in, y0, x0, ly, lx, inside, nan, H, W, xs_h, xs_w, 0, 1)
                v += _corner(x_pix, chan, c_in, y0, x0, ly, lx, inside, nan, H, W, xs_h, xs_w, 1, 0)
                v += _corner(x_pix, chan, c_in, y0, x0, ly, lx, inside, nan, H, W, xs_h, xs_w, 1, 1)
                # channels past the chunk's end must be 0, not NaN * 0: they meet a weight of 0
                col = tl.where(c_in[:, None], v * mk[None, :], 0.0)
                wt = tl.load(
                    w_rows[:, None] + ((c - c_group) * ws_c + i * ws_h + j * ws_w)[None, :],
                    mask=o_in[:, None] & c_in[None, :],
                    other=0.0,
                )
                acc = tl.dot(
                    wt.to(DOT_DTYPE), col.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION
                )
    if HAS_BIAS:
        acc += tl.load(bias_ptr + g * og + o, mask=o_in, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + (g * og + o)[:, None] * ys_c + (n * ys_n + ho * ys_h + wo * ys_w)[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=o_in[:, None] & m_in[None, :])


# Tile sizes on CUDA: autotuned per (channel widths, kernel size, dtype); tl.dot needs sides >= 16.
# (BLOCK_N output channels, BLOCK_M pixels, BLOCK_K channels, warps, stages)
_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_K": bk}, num_warps=nw, num_stages=ns)
    for bn, bm, bk, nw, ns in [
        (64, 64, 32, 4, 2),
        (64, 128, 32, 4, 2),
        (128, 64, 32, 4, 2),
        (128, 128, 32, 8, 2),
        (64, 128, 64, 8, 2),
        (128, 64, 16, 4, 3),
        (32, 64, 32, 4, 2),
        (16, 64, 16, 2, 2),
        (256, 64, 32, 8, 2),
        (256, 32, 32, 8, 3),
    ]
]
_mdconv_forward_tuned = triton.autotune(_CONFIGS, key=["cg", "og", "cd", "KH", "KW"])(
    _mdconv_forward_kernel
)
INTERPRETED: bool = not isinstance(_mdconv_forward_kernel, triton.runtime.JITFunction)
"""Whether the kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1`` when this module was
imported): then it takes CPU tensors, with the fixed tiles of ``INTERPRETER_BLOCKS``."""
INTERPRETER_BLOCKS = {"BLOCK_N": 16, "BLOCK_M": 32, "BLOCK_K": 16}
"""Tiles in the interpreter, where autotuning would only time numpy; tests change them to leave
partial tiles in every dimension."""


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


def mdconv_forward(
    input, offset, mask, weight, bias, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups, dg
):
    """``dcnv2::modulated_deform_conv2d`` by the fused kernel (arguments already checked).

    Args:
        input: (N, C, H, W); offset (N, 2 * dg * K, Ho, Wo); mask (N, dg * K, Ho, Wo);
            weight (O, C / groups, kh, kw); bias (O,) or None. float16, bfloat16 or float32, all of
            one dtype and device (CUDA, or CPU under ``TRITON_INTERPRET=1``); any strides.
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
    # weight as (O, kh, kw, cg) in memory: a tile's channels are adjacent
    weight = weight.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    og, cd, M = out_channels // groups, C // dg, N * Ho * Wo
    dtype = input.dtype
    dot_dtype = _TL_DTYPES[dtype]
    if INTERPRETED and dtype == torch.bfloat16:
        dot_dtype = tl.float32  # the interpreter's tl.dot mishandles bfloat16; exact in float32
    args = (
        input, offset, mask, weight, bias if bias is not None else weight, out,
        M, H, W, Ho, Wo, groups, cg, og, cd, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        *input.stride(), *offset.stride(), *mask.stride(), *weight.stride(), *out.stride(),
    )  # fmt: skip
    meta = dict(
        HAS_BIAS=bias is not None,
        KH=kh,
        KW=kw,
        DOT_DTYPE=dot_dtype,
        DOT_PRECISION=dot_precision(dtype),
    )

    def grid(blocks):
        return (triton.cdiv(M, blocks["BLOCK_M"]) * groups * triton.cdiv(og, blocks["BLOCK_N"]),)

    if INTERPRETED:
        if not is_fake(input):  # the interpreter would read fake tensors' missing data
            _mdconv_forward_kernel[grid(INTERPRETER_BLOCKS)](*args, **meta, **INTERPRETER_BLOCKS)
    else:
        with torch.cuda.device(input.device):
            wrap_triton(_mdconv_forward_tuned)[grid](*args, **meta)
    return out
