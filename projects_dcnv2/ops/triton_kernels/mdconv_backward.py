"""Backward of the fused modulated deformable convolution in Triton: the five gradients without a
column buffer.

Shape shorthand: N batch, C input channels, H x W input, O output channels, G conv groups
(cg = C / G input and og = O / G output channels per group), DG deformable groups (cd = C / DG
channels each), kh x kw kernel, K = kh * kw taps (row-major), Ho x Wo output, P = Ho * Wo pixels.
offset is (N, DG * K * 2, Ho, Wo) as [group][tap][dy, dx]; mask is (N, DG * K, Ho, Wo).

The column gradient gcol[n, c, k, p] = sum over o in c's conv group of weight[o, c - g*cg, k] *
grad[n, o, p] lives only in registers, one (pixels x channels) tile at a time, as the product of a
(pixels x output channels) tile of grad and an (output channels x channels) tile of weight:

* ``_grad_input_offset_mask_kernel``, one program per (pixel tile, image, deformable group, part of
  the group's channels): for each tap it places the tile's samples once, then for each channel
  chunk of its part (split where a conv group ends) computes the gcol tile, scatters
  gcol * mask * bilinear weight into a float32 grad_input with atomic adds, and reduces
  gcol * sample (the mask gradient) and gcol * d sample / d(y, x) (times the mask: the offset
  gradient) over the part's channels in registers, then adds them to float32 offset and mask
  gradients with atomics (the parts of a group meet there; small maps need parts to fill the GPU).
* ``_grad_weight_kernel``: grad_weight[o, c, k] = sum over (n, p) of grad[n, o, p] * col[n, c, k, p]
  as an implicit GEMM, the column tile col = mask * sample re-sampled in registers. The N * P
  reduction is split into ``split`` parts added with float32 atomics into one weight-sized buffer
  (split-K with atomics rather than a second pass: a second pass would hold ``split`` partial weight
  gradients, up to tens of MB at ResNet c5 widths, and grad_input's atomics already make the op
  non-deterministic).
* grad_bias: grad summed over (N, Ho, Wo) in float32 (torch).

Accumulation is float32 for float16, bfloat16 and float32 inputs; float64 is not supported here (it
stays on the column path). docs/fused_mdconv.md has the design and what the tests check.
"""

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

from . import dot_precision
from .common import dcn_cell, dcn_corner, tap_position

__all__ = ["mdconv_backward", "FUSED_BACKWARD_DEFAULT", "INTERPRETED", "INTERPRETER_BLOCKS"]

FUSED_BACKWARD_DEFAULT = False
"""Whether the dispatcher sends the CUDA backward to these kernels by default (``cuda_impl``): False,
as they were slower than the column path on an NVIDIA H200 (docs/gpu_runs/2026-12-04_h200.md)."""


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _tap_corner(y0, x0, ly, lx, inside, nan, m, p_in, H, W, xs_h, xs_w, is_h, is_w,
                DY: tl.constexpr, DX: tl.constexpr):  # fmt: skip
    """Corner (DY, DX) of a tap's samples, placed once per tap: its pixel's offsets into the input
    and into the grad_input buffer, whether it reads the input, whether and with which weight
    (bilinear weight x mask) it receives a gradient, and its value, dy and dx weights."""
    yn, xn, valid, w, wy, wx = dcn_corner(y0, x0, ly, lx, inside, nan, H, W, DY, DX)
    # w != 0 also holds for NaN weights: a NaN sample poisons grad_input at the corner it names
    # (pixel (0, 0)), as the CPU and CUDA kernels do
    scatter = (w != 0.0) & p_in
    return yn * xs_h + xn * xs_w, yn * is_h + xn * is_w, valid, scatter, w * m, w, wy, wx


@triton.jit
def _gather_scatter(x_img, gin_img, c, c_in, xs_c, is_c, gcol, x_pix, gin_pix, valid, scatter, wm):
    """One corner and one (pixels x channels) gcol tile: adds gcol * bilinear weight * mask to
    grad_input at the corner; returns, per pixel, the sum over the tile's channels of gcol x the
    corner's input value."""
    v = tl.load(
        x_img + c[None, :] * xs_c + x_pix[:, None], mask=valid[:, None] & c_in[None, :], other=0.0
    ).to(tl.float32)
    tl.atomic_add(
        gin_img + c[None, :] * is_c + gin_pix[:, None],
        wm[:, None] * gcol,
        mask=scatter[:, None] & c_in[None, :],
    )
    return tl.sum(gcol * v, axis=1)


@triton.jit
def _grad_input_offset_mask_kernel(
    grad_ptr, x_ptr, off_ptr, mask_ptr, w_ptr, gin_ptr, goff_ptr, gmask_ptr,
    H, W, Ho, Wo, DG, cg, og, cd,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    gs_n, gs_c, gs_h, gs_w, xs_n, xs_c, xs_h, xs_w, os_n, os_c, os_h, os_w,
    ms_n, ms_c, ms_h, ms_w, ws_o, ws_c, ws_h, ws_w, is_n, is_c, is_h, is_w,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """grad_input, grad_offset and grad_mask (float32 buffers, atomics; the latter two contiguous) of
    one (image, deformable group, pixel tile) from the channels of part ``program_id(2)`` of
    ``num_programs(2)`` of the deformable group's (``span`` channels, a multiple of BLOCK_C); grid
    (cdiv(P, BLOCK_P), N * DG, parts)."""
    n = tl.program_id(1) // DG
    d = tl.program_id(1) % DG
    P = Ho * Wo
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_in = p < P
    ho = p // Wo
    wo = p % Wo
    grad_pix = grad_ptr + n * gs_n + ho * gs_h + wo * gs_w
    off_pix = off_ptr + n * os_n + ho * os_h + wo * os_w
    mask_pix = mask_ptr + n * ms_n + ho * ms_h + wo * ms_w
    x_img = x_ptr + n * xs_n
    gin_img = gin_ptr + n * is_n
    span = tl.cdiv(tl.cdiv(cd, tl.num_programs(2)), BLOCK_C) * BLOCK_C
    c_first = d * cd + tl.program_id(2) * span
    c_end = tl.minimum(d * cd + cd, c_first + span)
    for k in range(KH * KW):
        i = k // KW
        j = k % KW
        dk = d * KH * KW + k  # mask channel; offset channels 2 * dk (dy) and 2 * dk + 1 (dx)
        dy = tl.load(off_pix + (2 * dk) * os_c, mask=p_in, other=0.0)
        dx = tl.load(off_pix + (2 * dk + 1) * os_c, mask=p_in, other=0.0)
        m = tl.load(mask_pix + dk * ms_c, mask=p_in, other=0.0).to(tl.float32)
        y, x = tap_position(ho, wo, i, j, dy, dx, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w)
        y0, x0, ly, lx, inside, nan = dcn_cell(y, x, H, W)
        xa, ia, va, sa, wma, wa, wya, wxa = _tap_corner(
            y0, x0, ly, lx, inside, nan, m, p_in, H, W, xs_h, xs_w, is_h, is_w, 0, 0
        )
        xb, ib, vb, sb, wmb, wb, wyb, wxb = _tap_corner(
            y0, x0, ly, lx, inside, nan, m, p_in, H, W, xs_h, xs_w, is_h, is_w, 0, 1
        )
        xc, ic, vc, sc, wmc, wc, wyc, wxc = _tap_corner(
            y0, x0, ly, lx, inside, nan, m, p_in, H, W, xs_h, xs_w, is_h, is_w, 1, 0
        )
        xd, jd, vd, sd, wmd, wd, wyd, wxd = _tap_corner(
            y0, x0, ly, lx, inside, nan, m, p_in, H, W, xs_h, xs_w, is_h, is_w, 1, 1
        )
        # per corner: the sum over the group's channels of gcol x the corner's value
        da = tl.zeros([BLOCK_P], tl.float32)
        db = tl.zeros([BLOCK_P], tl.float32)
        dc = tl.zeros([BLOCK_P], tl.float32)
        dd = tl.zeros([BLOCK_P], tl.float32)
        # the part's channels, split where a conv group ends
        for g in range(c_first // cg, (c_end - 1) // cg + 1):
            c_hi = tl.minimum(c_end, (g + 1) * cg)
            for c0 in range(tl.maximum(c_first, g * cg), c_hi, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                c_in = c < c_hi
                w_tap = w_ptr + ((c - g * cg) * ws_c + i * ws_h + j * ws_w)[None, :]
                gcol = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
                for o0 in range(0, og, BLOCK_O):
                    ol = o0 + tl.arange(0, BLOCK_O)
                    o_in = ol < og
                    o = g * og + ol
                    a = tl.load(
                        grad_pix[:, None] + o[None, :] * gs_c,
                        mask=p_in[:, None] & o_in[None, :],
                        other=0.0,
                    )
                    wt = tl.load(
                        w_tap + o[:, None] * ws_o, mask=o_in[:, None] & c_in[None, :], other=0.0
                    )
                    gcol = tl.dot(
                        a.to(DOT_DTYPE), wt.to(DOT_DTYPE), gcol, input_precision=DOT_PRECISION
                    )
                da += _gather_scatter(
                    x_img, gin_img, c, c_in, xs_c, is_c, gcol, xa, ia, va, sa, wma
                )
                db += _gather_scatter(
                    x_img, gin_img, c, c_in, xs_c, is_c, gcol, xb, ib, vb, sb, wmb
                )
                dc += _gather_scatter(
                    x_img, gin_img, c, c_in, xs_c, is_c, gcol, xc, ic, vc, sc, wmc
                )
                dd += _gather_scatter(
                    x_img, gin_img, c, c_in, xs_c, is_c, gcol, xd, jd, vd, sd, wmd
                )
        gm = wa * da + wb * db + wc * dc + wd * dd
        gy = (wya * da + wyb * db + wyc * dc + wyd * dd) * m
        gx = (wxa * da + wxb * db + wxc * dc + wxd * dd) * m
        planes = n * (DG * KH * KW) + dk  # as (N * DG * K) planes of P pixels
        tl.atomic_add(goff_ptr + (2 * planes) * P + p, gy, mask=p_in)
        tl.atomic_add(goff_ptr + (2 * planes + 1) * P + p, gx, mask=p_in)
        tl.atomic_add(gmask_ptr + planes * P + p, gm, mask=p_in)


@triton.jit
def _grad_weight_kernel(
    grad_ptr, x_ptr, off_ptr, mask_ptr, gw_ptr,
    N, H, W, Ho, Wo, DG, cg, og, cd,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    gs_n, gs_c, gs_h, gs_w, xs_n, xs_c, xs_h, xs_w, os_n, os_c, os_h, os_w,
    ms_n, ms_c, ms_h, ms_w, gws_o, gws_c, gws_h, gws_w,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    COL_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """grad_weight (float32 buffer, atomics) of one (conv group, output-channel tile, tap, channel
    tile), summed over every ``num_programs(2)``-th pixel tile of the N * P pixels; grid
    (G * cdiv(og, BLOCK_O), K * cdiv(cg, BLOCK_C), split)."""
    o_tiles = tl.cdiv(og, BLOCK_O)
    c_tiles = tl.cdiv(cg, BLOCK_C)
    g = tl.program_id(0) // o_tiles
    ol = (tl.program_id(0) % o_tiles) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_in = ol < og
    o = g * og + ol
    k = tl.program_id(1) // c_tiles
    i = k // KW
    j = k % KW
    cl0 = (tl.program_id(1) % c_tiles) * BLOCK_C
    cl = cl0 + tl.arange(0, BLOCK_C)
    c_in = cl < cg
    c = g * cg + cl
    c_dg = c // cd
    # the deformable groups that the channel tile meets
    d_first = (g * cg + cl0) // cd
    d_last = (g * cg + tl.minimum(cl0 + BLOCK_C, cg) - 1) // cd
    P = Ho * Wo
    p_tiles = tl.cdiv(P, BLOCK_P)
    acc = tl.zeros([BLOCK_O, BLOCK_C], tl.float32)
    for t in range(tl.program_id(2), N * p_tiles, tl.num_programs(2)):
        n = t // p_tiles
        p = (t % p_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_in = p < P
        ho = p // Wo
        wo = p % Wo
        gt = tl.load(
            grad_ptr + n * gs_n + o[:, None] * gs_c + (ho * gs_h + wo * gs_w)[None, :],
            mask=o_in[:, None] & p_in[None, :],
            other=0.0,
        )
        off_pix = off_ptr + n * os_n + ho * os_h + wo * os_w
        mask_pix = mask_ptr + n * ms_n + ho * ms_h + wo * ms_w
        x_img = x_ptr + n * xs_n
        col = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        for d in range(d_first, d_last + 1):
            dk = d * KH * KW + k
            dy = tl.load(off_pix + (2 * dk) * os_c, mask=p_in, other=0.0)
            dx = tl.load(off_pix + (2 * dk + 1) * os_c, mask=p_in, other=0.0)
            m = tl.load(mask_pix + dk * ms_c, mask=p_in, other=0.0).to(tl.float32)
            y, x = tap_position(
                ho, wo, i, j, dy, dx, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w
            )
            y0, x0, ly, lx, inside, nan = dcn_cell(y, x, H, W)
            ch = (c_in & (c_dg == d))[None, :]
            val = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
            for corner in tl.static_range(4):
                yn, xn, valid, w, wy, wx = dcn_corner(
                    y0, x0, ly, lx, inside, nan, H, W, corner // 2, corner % 2
                )
                v = tl.load(
                    x_img + c[None, :] * xs_c + (yn * xs_h + xn * xs_w)[:, None],
                    mask=valid[:, None] & ch,
                    other=0.0,
                ).to(tl.float32)
                val += w[:, None] * v
            # only the group's channels, and pixels in the map: elsewhere 0, not NaN * 0
            col = tl.where(ch & p_in[:, None], m[:, None] * val, col)
        # the column tile rounded to the input dtype, as the column path stores it
        col_t = col.to(COL_DTYPE).to(DOT_DTYPE)
        acc = tl.dot(gt.to(DOT_DTYPE), col_t, acc, input_precision=DOT_PRECISION)
    tl.atomic_add(
        gw_ptr + o[:, None] * gws_o + (cl * gws_c + i * gws_h + j * gws_w)[None, :],
        acc,
        mask=o_in[:, None] & c_in[None, :],
    )


# ------------------------------------------------------------------------------------------------
# Launch
# ------------------------------------------------------------------------------------------------
# Tile sizes on CUDA: autotuned per (channel widths, kernel size, dtype); tl.dot needs sides >= 16.
def _configs(names, rows):
    return [triton.Config(dict(zip(names, r[:3])), num_warps=r[3], num_stages=r[4]) for r in rows]


# (BLOCK_P pixels, BLOCK_C channels, BLOCK_O output channels, warps, stages)
_INPUT_CONFIGS = _configs(
    ("BLOCK_P", "BLOCK_C", "BLOCK_O"),
    [(32, 32, 32, 4, 2), (64, 32, 32, 4, 2), (64, 64, 32, 4, 2), (128, 32, 32, 4, 2),
     (128, 64, 32, 8, 2), (64, 32, 64, 4, 3), (32, 16, 16, 2, 2)],
)  # fmt: skip
# (BLOCK_O output channels, BLOCK_P pixels, BLOCK_C channels, warps, stages)
_WEIGHT_CONFIGS = _configs(
    ("BLOCK_O", "BLOCK_P", "BLOCK_C"),
    [(64, 32, 32, 4, 2), (64, 64, 32, 4, 2), (128, 32, 32, 4, 2), (64, 32, 64, 4, 2),
     (128, 64, 64, 8, 2), (32, 32, 32, 4, 2), (16, 32, 16, 2, 2)],
)  # fmt: skip
_KEY = ["cg", "og", "cd", "KH", "KW"]


def _fits(limits):
    """An autotuner pruning rule: the configs whose tile sides (``limits``: tile name -> argument
    names) stay within the smallest of those channel counts rounded up to a power of two (at least
    16, ``tl.dot``'s smallest side); the smallest config if none does."""

    def prune(configs, named_args, **kwargs):
        caps = {
            block: max(16, triton.next_power_of_2(min(named_args[a] for a in args)))
            for block, args in limits.items()
        }
        kept = [c for c in configs if all(c.kwargs[b] <= cap for b, cap in caps.items())]
        return kept or [min(configs, key=lambda c: sorted(c.kwargs.values()))]

    return prune


# The accumulators start from zero again for every timed config (reset_to_zero). Tiles wider than
# the channels are not timed: they only leave lanes idle (and tiny test shapes tune nothing).
_grad_input_offset_mask_tuned = triton.autotune(
    _INPUT_CONFIGS,
    key=_KEY,
    reset_to_zero=["gin_ptr", "goff_ptr", "gmask_ptr"],
    prune_configs_by={"early_config_prune": _fits({"BLOCK_C": ("cg", "cd"), "BLOCK_O": ("og",)})},
)(_grad_input_offset_mask_kernel)
_grad_weight_tuned = triton.autotune(
    _WEIGHT_CONFIGS,
    key=_KEY,
    reset_to_zero=["gw_ptr"],
    prune_configs_by={"early_config_prune": _fits({"BLOCK_C": ("cg",), "BLOCK_O": ("og",)})},
)(_grad_weight_kernel)
INTERPRETED: bool = not isinstance(_grad_weight_kernel, triton.runtime.JITFunction)
"""Whether the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` when this module was
imported): then they take CPU tensors, with the fixed tiles of ``INTERPRETER_BLOCKS``."""
INTERPRETER_BLOCKS = {"BLOCK_P": 32, "BLOCK_C": 16, "BLOCK_O": 16}
"""Tiles in the interpreter (both kernels), where autotuning would only time numpy."""

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


# Programs each kernel aims for per streaming multiprocessor when it splits work to fill the GPU.
_PROGRAMS_PER_SM = 4


def _weight_split(tiles, programs, sms):
    """Parts of grad_weight's N * P reduction: about ``_PROGRAMS_PER_SM`` programs per streaming
    multiprocessor (``sms``; None in the interpreter: two parts, so that the tests' atomics add up
    parts, of unequal length for an odd number of tiles); never more parts than pixel tiles."""
    want = 2 if sms is None else triton.cdiv(_PROGRAMS_PER_SM * sms, max(programs, 1))
    return max(1, min(tiles, want))


def _channel_parts(cd, block_c, tiles, sms):
    """Parts a deformable group's channels are split into across programs of the input/offset/mask
    kernel (each part whole BLOCK_C chunks, none empty): enough for about ``_PROGRAMS_PER_SM``
    programs per streaming multiprocessor when the (pixel tile, image, group) programs alone are
    fewer; two in the interpreter (``sms`` None), so that the tests add parts."""
    chunks = triton.cdiv(cd, block_c)
    want = 2 if sms is None else triton.cdiv(_PROGRAMS_PER_SM * sms, max(tiles, 1))
    parts = max(1, min(chunks, want))
    span = triton.cdiv(chunks, parts) * block_c  # whole chunks per part, as the kernel computes
    return triton.cdiv(cd, span)


def _check_device(input):
    if INTERPRETED and input.device.type != "cpu":
        raise RuntimeError(
            "dcnv2._triton_modulated_deform_conv2d_backward: input: the kernels were defined with "
            f"TRITON_INTERPRET=1 and take CPU tensors, got one on {input.device}"
        )
    if not INTERPRETED and input.device.type != "cuda":
        raise RuntimeError(
            "dcnv2._triton_modulated_deform_conv2d_backward: input: expected a CUDA tensor, or CPU "
            f"tensors with TRITON_INTERPRET=1 set before the first call; got one on {input.device}"
        )


def mdconv_backward(
    grad, input, offset, mask, weight, bias,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups, dg, *, split=None,
):  # fmt: skip
    """The five gradients of ``dcnv2::modulated_deform_conv2d`` by the fused kernels (arguments
    already checked, as ``_triton_ops._triton_mdconv_backward`` does).

    Args:
        grad: (N, O, Ho, Wo) gradient of the output.
        input: (N, C, H, W); offset (N, 2 * dg * K, Ho, Wo); mask (N, dg * K, Ho, Wo);
            weight (O, C / groups, kh, kw); bias (O,) or None. float16, bfloat16 or float32, all of
            one dtype and device (CUDA, or CPU under ``TRITON_INTERPRET=1``); any strides.
        stride_h, ..., dg: as the op.
        split: parts of grad_weight's reduction over N * Ho * Wo (default: ``_weight_split``).
    Returns:
        (grad_input, grad_offset, grad_mask, grad_weight, grad_bias), contiguous, in the input's
        dtype; grad_bias is (O,), or an empty (0,) tensor when bias is None.
    """
    N, C, H, W = input.shape
    out_channels, cg, kh, kw = weight.shape
    Ho, Wo = grad.shape[2:]
    og, cd, P, dtype = out_channels // groups, C // dg, Ho * Wo, input.dtype
    # float32 accumulators: grad_input channels-last (a pixel's channels adjacent for the atomics),
    # grad_weight as (O, kh, kw, cg)
    goff = offset.new_zeros(offset.shape, dtype=torch.float32)
    gmask = mask.new_zeros(mask.shape, dtype=torch.float32)
    gin = input.new_zeros((N, H, W, C), dtype=torch.float32).permute(0, 3, 1, 2)
    gw = weight.new_zeros((out_channels, kh, kw, cg), dtype=torch.float32).permute(0, 3, 1, 2)
    if bias is not None:
        grad_bias = grad.sum(dim=(0, 2, 3), dtype=torch.float32).to(dtype)
    else:
        grad_bias = input.new_empty((0,))
    if min(N, C, H, W, out_channels, P) > 0:
        _check_device(input)
        x = input.contiguous(memory_format=torch.channels_last)  # a pixel's channels adjacent
        w = weight.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # (O, kh, kw, cg) in memory
        dot_dtype = _TL_DTYPES[dtype]
        if INTERPRETED and dtype == torch.bfloat16:
            dot_dtype = tl.float32  # the interpreter's tl.dot mishandles bfloat16; exact in float32
        meta = dict(KH=kh, KW=kw, DOT_DTYPE=dot_dtype, DOT_PRECISION=dot_precision(dtype))
        geometry = (stride_h, stride_w, pad_h, pad_w, dil_h, dil_w)
        strides = (*grad.stride(), *x.stride(), *offset.stride(), *mask.stride())
        args_input = (
            grad, x, offset, mask, w, gin, goff, gmask, H, W, Ho, Wo, dg, cg, og, cd,
            *geometry, *strides, *w.stride(), *gin.stride(),
        )  # fmt: skip
        args_weight = (
            grad, x, offset, mask, gw, N, H, W, Ho, Wo, dg, cg, og, cd, *geometry, *strides,
            *gw.stride(),
        )  # fmt: skip

        # the grids are plain integer arithmetic of the tile sizes (evaluated per autotuned config)
        sms = (
            None
            if INTERPRETED
            else torch.cuda.get_device_properties(input.device).multi_processor_count
        )

        def grid_input(blocks):
            tiles = triton.cdiv(P, blocks["BLOCK_P"]) * N * dg
            parts = _channel_parts(cd, blocks["BLOCK_C"], tiles, sms)
            return triton.cdiv(P, blocks["BLOCK_P"]), N * dg, parts

        def grid_weight(blocks):
            rows = groups * triton.cdiv(og, blocks["BLOCK_O"])
            cols = kh * kw * triton.cdiv(cg, blocks["BLOCK_C"])
            tiles = N * triton.cdiv(P, blocks["BLOCK_P"])
            parts = split if split is not None else _weight_split(tiles, rows * cols, sms)
            return rows, cols, parts

        col_dtype = _TL_DTYPES[dtype]
        if INTERPRETED:
            if not is_fake(input):  # the interpreter would run on fake tensors' missing data
                blocks = INTERPRETER_BLOCKS
                wrap_triton(_grad_input_offset_mask_kernel)[grid_input(blocks)](
                    *args_input, **meta, **blocks
                )
                wrap_triton(_grad_weight_kernel)[grid_weight(blocks)](
                    *args_weight, COL_DTYPE=col_dtype, **meta, **blocks
                )
        else:
            with torch.cuda.device(input.device):
                wrap_triton(_grad_input_offset_mask_tuned)[grid_input](*args_input, **meta)
                wrap_triton(_grad_weight_tuned)[grid_weight](
                    *args_weight, COL_DTYPE=col_dtype, **meta
                )
    return (
        gin.to(dtype=dtype, memory_format=torch.contiguous_format),
        goff.to(dtype),
        gmask.to(dtype),
        gw.to(dtype=dtype, memory_format=torch.contiguous_format),
        grad_bias,
    )
