"""What Triton's real compiler makes of the fused kernels for H100/H200 (sm_90) and B200 (sm_100),
checked on CPU: no GPU is needed to compile, only to run.

Each kernel is compiled (in a subprocess without ``TRITON_INTERPRET`` and with an empty cache) with
the specialisation its launch gives at ResNet-50's DCN layers at 800 x 1344 (c3: 128 channels at
100 x 168, c4: 256 at 50 x 84, c5: 512 at 25 x 42; 3 x 3, one deformable group): the config
table's tiles, warps and stages, 16-divisible pointers and sizes marked as Triton's launcher marks
them, arguments equal to 1 (the channel stride among them) as constants. From the PTX, the SASS
(``cuobjdump``) and the resource usage the tests assert:

* the input gathers are 16-byte vectors (``cp.async.cg`` / ``LDGSTS.E.BYPASS.128``, or
  ``ld.global.v4`` / ``LDG.E.128``), i.e. the corner rows are read as 8 half channels at a time;
* the products run on the tensor cores (``wgmma`` / ``HGMMA`` on sm_90, ``tcgen05.mma`` /
  ``UTCHMMA`` on sm_100);
* no local-memory spills (``LOCAL:0``, no ``LDL`` / ``STL``);
* registers per thread and shared memory within the SM's limits (printed with ``-s``);
* each config compiles in under 2 s of CPU time, the compiler and ptxas together (the first
  call's cost, now that nothing is autotuned; wall time on a shared machine is printed too).

The backward kernels are checked the same way for the record (``BACKWARD_XFAIL`` holds what they
miss, measured). The interpreter's correctness tests are test_triton_mdconv*.py and
test_triton_forward_layout.py.
"""

import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

# ResNet-50 at 800 x 1344 (Detectron2 pads to a multiple of 32): (C = O, H = W's map)
SHAPES = {"c3": (128, 100, 168), "c4": (256, 50, 84), "c5": (512, 25, 42)}
ARCHS = {"sm90": 90, "sm100": 100}
DTYPES = ["float16", "bfloat16"]
SMS = 132  # an H100/H200's streaming multiprocessors (the split-K rule's target)
LIMITS = {  # per SM, both architectures: registers a thread, registers, shared memory a block
    "regs_per_thread": 255,
    "regs": 65536,
    "shared": 227 * 1024,
}
COMPILE_S = 2.0


# ------------------------------------------------------------------------------------------------
# The compiler side (runs in the subprocess)
# ------------------------------------------------------------------------------------------------
def _compile(fn, args, meta, arch, bin_dir):
    """Compile ``fn`` as a launch with ``args`` (tensors: meta tensors) and ``meta`` (constexprs
    plus num_warps / num_stages) would; the report of what came out."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptr = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    signature, constexprs, attrs = {}, {}, {}
    for idx, name in enumerate(fn.arg_names):
        if name in meta:
            signature[name], constexprs[name] = "constexpr", meta[name]
            continue
        value = args[idx]
        if isinstance(value, torch.Tensor):  # CUDA allocations are 16-byte aligned
            signature[name], attrs[(idx,)] = ptr[value.dtype], [["tt.divisibility", 16]]
        elif value == 1:  # Triton's launcher specialises 1 as a constant
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(idx,)] = [["tt.divisibility", 16]]
    options = {k: meta[k] for k in ("num_warps", "num_stages")}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    wall, cpu = time.perf_counter(), _cpu_seconds()
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
    ptx = kernel.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        tool = os.path.join(bin_dir, "cuobjdump")
        sass = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True).stdout
        usage = subprocess.run([tool, "-res-usage", cubin], capture_output=True, text=True).stdout
    resources = dict(re.findall(r"(REG|LOCAL|STACK):(\d+)", usage))
    return {
        "seconds": round(cpu, 3),
        "wall_seconds": round(wall, 3),
        "warps": meta["num_warps"],
        "stages": meta["num_stages"],
        "regs": int(resources["REG"]),
        "local": int(resources["LOCAL"]) + int(resources["STACK"]),
        "shared": int(kernel.metadata.shared),
        "ptx_v4_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx)),
        "ptx_cp_async_16": len(re.findall(r"cp\.async\.cg\.shared\.global", ptx)),
        "ptx_b16_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.b16", ptx)),
        "ptx_mma": len(re.findall(r"\b(?:wgmma\.mma_async|mma\.sync|tcgen05\.mma)", ptx)),
        "sass_128_loads": len(re.findall(r"\b(?:LDG|LDGSTS)\.E(?:\.\w+)*\.128\b", sass)),
        "sass_mma": len(re.findall(r"\b(?:HGMMA|HMMA|UTCHMMA|UTCQMMA)\b", sass)),
        "sass_spills": len(re.findall(r"\b(?:LDL|STL)\b", sass)),
    }


def _cpu_seconds():
    """CPU time of this process and its finished children (ptxas): a compile's cost on an idle
    machine, whatever else shares the CPUs."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _meta_tensors(shape, dtype, batch):
    import torch

    C, H, W = SHAPES[shape]
    dt = getattr(torch, dtype)

    def empty(*size):
        return torch.empty(*size, device="meta", dtype=dt)

    x, offset, mask = empty(batch, C, H, W), empty(batch, 18, H, W), empty(batch, 9, H, W)
    return x, offset, mask, empty(C, C, 3, 3), empty(C), empty(batch, C, H, W)


def forward_reports():
    """Every (shape, dtype, arch, batch 1 and 2) launch of the forward kernel, compiled."""
    import triton
    import triton.language as tl

    from projects_dcnv2.ops.triton_kernels import mdconv_forward as mf

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    _warm_up(bin_dir)
    reports = []
    for shape in SHAPES:
        for dtype in DTYPES:
            for arch_name, arch in ARCHS.items():
                for batch in (1, 2):
                    x, offset, mask, weight, bias, out = _meta_tensors(shape, dtype, batch)
                    args, meta, grid = mf.launch_spec(
                        x, offset, mask, weight, bias, 1, 1, 1, 1, 1, 1, 1, 1, out, SMS
                    )
                    meta["DOT_DTYPE"] = getattr(tl, dtype)
                    report = _compile(mf._mdconv_forward_kernel, args, meta, arch, bin_dir)
                    tiles = {k: meta[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
                    reports.append(
                        dict(
                            report,
                            shape=shape,
                            dtype=dtype,
                            arch=arch_name,
                            batch=batch,
                            grid=list(grid),
                            tiles=tiles,
                        )  # fmt: skip
                    )
    return reports


def backward_reports():
    """Both backward kernels at c4 in float16 for sm_90, each autotuning config compiled with the
    launch's arguments (mdconv_backward builds them the same way)."""
    import torch
    import triton
    import triton.language as tl

    from projects_dcnv2.ops.triton_kernels import mdconv_backward as mb

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    _warm_up(bin_dir)
    x, offset, mask, weight, _, grad = _meta_tensors("c4", "float16", 1)
    N, C, H, W = x.shape
    out_channels, cg, kh, kw = weight.shape
    Ho, Wo = grad.shape[2:]
    f32 = dict(dtype=torch.float32)
    goff, gmask = offset.new_zeros(offset.shape, **f32), mask.new_zeros(mask.shape, **f32)
    gin = x.new_zeros((N, H, W, C), **f32).permute(0, 3, 1, 2)
    gw = weight.new_zeros((out_channels, kh, kw, cg), **f32).permute(0, 3, 1, 2)
    xc = x.contiguous(memory_format=torch.channels_last)
    w = weight.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    geometry = (1, 1, 1, 1, 1, 1)
    strides = (*grad.stride(), *xc.stride(), *offset.stride(), *mask.stride())
    args_input = (
        grad, xc, offset, mask, w, gin, goff, gmask, H, W, Ho, Wo, 1, cg, out_channels, C,
        *geometry, *strides, *w.stride(), *gin.stride(),
    )  # fmt: skip
    args_weight = (
        grad, xc, offset, mask, gw, N, H, W, Ho, Wo, 1, cg, out_channels, C, *geometry, *strides, *gw.stride()
    )  # fmt: skip
    base = dict(KH=3, KW=3, DOT_DTYPE=tl.float16, DOT_PRECISION="ieee")
    reports = []
    for name, fn, args, configs, extra in (
        ("grad_input", mb._grad_input_offset_mask_kernel, args_input, mb._INPUT_CONFIGS, {}),
        ("grad_weight", mb._grad_weight_kernel, args_weight, mb._WEIGHT_CONFIGS,
         {"COL_DTYPE": tl.float16}),
    ):  # fmt: skip
        for config in configs:
            meta = dict(base, **extra, **config.kwargs)
            meta.update(num_warps=config.num_warps, num_stages=config.num_stages)
            report = _compile(fn, args, meta, 90, bin_dir)
            reports.append(dict(report, kernel=name, tiles=dict(config.kwargs)))
    return reports


def _warm_up(bin_dir):
    """One small compile first, so that no config's time holds the compiler's one-time start."""
    import triton
    import triton.language as tl

    @triton.jit
    def _copy(src_ptr, dst_ptr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(dst_ptr + i, tl.load(src_ptr + i))

    import torch

    t = torch.empty(16, device="meta")
    _compile(_copy, (t, t), {"BLOCK": 16, "num_warps": 1, "num_stages": 1}, 90, bin_dir)


# ------------------------------------------------------------------------------------------------
# The tests (this process: the subprocess's JSON)
# ------------------------------------------------------------------------------------------------
def _run(which):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, TESTS, env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache  # compile times from scratch, as a first call's
        run = subprocess.run(
            [sys.executable, os.path.abspath(__file__), which],
            env=env, capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip
    if run.returncode != 0:
        tail = run.stderr[-3000:]
        if "ModuleNotFoundError: No module named 'triton'" in tail:
            pytest.skip("Triton is not installed")
        if "backends" in tail and ("nvidia" in tail or "cuda" in tail):
            pytest.skip("Triton's CUDA backend cannot compile here: " + tail.splitlines()[-1])
        raise AssertionError(tail)
    return json.loads(run.stdout.splitlines()[-1])


@functools.cache
def _reports(which):
    return _run(which)


def _one(shape, dtype, arch, batch):
    (report,) = [
        r
        for r in _reports("forward")
        if (r["shape"], r["dtype"], r["arch"], r["batch"]) == (shape, dtype, arch, batch)
    ]
    return report


def _check_resources(r, label):
    print(
        f"{label}: {r['regs']} registers x {32 * r['warps']} threads, {r['shared']} B shared, "
        f"{r['stages']} stages, {r['seconds']} s to compile"
    )
    assert r["local"] == 0 and r["sass_spills"] == 0, f"{label}: local memory / spills: {r}"
    assert r["regs"] <= LIMITS["regs_per_thread"], f"{label}: {r['regs']} registers a thread"
    assert r["regs"] * 32 * r["warps"] <= LIMITS["regs"], f"{label}: a block's registers"
    assert r["shared"] <= LIMITS["shared"], f"{label}: {r['shared']} B of shared memory"


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_forward_compiles_to_vector_gathers_and_tensor_cores(shape, dtype, arch, batch):
    r = _one(shape, dtype, arch, batch)
    label = f"forward {shape} {dtype} {arch} batch {batch} {r['tiles']} grid {r['grid']}"
    # 4 corners a step, at least: each a 16-byte vector (8 half channels), pipelined or not
    vectors = r["ptx_v4_loads"] + r["ptx_cp_async_16"]
    assert vectors >= 4 and r["sass_128_loads"] >= 4, f"{label}: no 16-byte gathers: {r}"
    # the only 2-byte loads left: each pixel's dy, dx and mask (a few per unrolled step)
    assert r["ptx_b16_loads"] < vectors, f"{label}: scalar loads outnumber vectors: {r}"
    assert r["ptx_mma"] > 0 and r["sass_mma"] > 0, f"{label}: no tensor-core MMA: {r}"
    _check_resources(r, label)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_forward_config_compiles_in_under_2_s(shape, dtype, arch):
    r = _one(shape, dtype, arch, 1)  # batch 2's launch is the same specialisation (cached) or not
    r2 = _one(shape, dtype, arch, 2)
    print(f"{shape} {dtype} {arch}: {r['seconds']} s / {r2['seconds']} s CPU to compile")
    for seconds in (r["seconds"], r2["seconds"]):
        assert seconds < COMPILE_S, f"{shape} {dtype} {arch}: {seconds} s of CPU to compile"


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_forward_grid_fills_132_sms(shape, batch):
    """The split-K rule: about two programs per SM or more (at most 16 parts, 8 steps a part)."""
    r = _one(shape, "float16", "sm90", batch)
    tiles, parts = r["grid"]
    assert tiles * parts >= 1.5 * SMS, f"{shape} batch {batch}: grid {r['grid']}"
    assert parts == 1 or tiles < 2 * SMS, f"{shape} batch {batch}: split though {tiles} tiles"


# What the existing backward kernels miss, measured 2026-12-05 (c4, float16, sm_90; Triton 3.8):
# (kernel, tiles in config order) -> reason. A fix makes the test pass and the strict xfail fail.
_SPILLS = "spills to local memory at 255 registers: {} B local, {} LDL/STL in SASS"
BACKWARD_XFAIL = {
    ("grad_input", (64, 32, 32)): _SPILLS.format(8, 4),
    ("grad_input", (64, 64, 32)): _SPILLS.format(904, 384),
    ("grad_input", (128, 32, 32)): _SPILLS.format(368, 228),
    ("grad_input", (128, 64, 32)): _SPILLS.format(888, 402),
    ("grad_input", (64, 32, 64)): _SPILLS.format(288, 116),
    ("grad_input", (32, 16, 16)): _SPILLS.format(40, 20) + " (168 registers, 2 warps)",
}


def _backward_params():
    from projects_dcnv2.ops.triton_kernels import mdconv_backward as mb

    params = []
    for name, configs in (("grad_input", mb._INPUT_CONFIGS), ("grad_weight", mb._WEIGHT_CONFIGS)):
        for config in configs:
            key = (name, tuple(sorted(config.kwargs.items())))
            reason = BACKWARD_XFAIL.get((name, tuple(config.kwargs.values())))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            tiles = "x".join(str(v) for v in config.kwargs.values())
            params.append(pytest.param(key, marks=marks, id=f"{name}-{tiles}"))
    return params


def _backward_config_params():
    try:
        return _backward_params()
    except ImportError:  # no Triton: the tests below skip
        return [pytest.param(None, marks=pytest.mark.skip(reason="Triton is not installed"))]


@pytest.mark.parametrize("key", _backward_config_params())
def test_backward_compiles_to_vector_gathers_and_tensor_cores(key):
    name, tiles = key
    (r,) = [
        r
        for r in _reports("backward")
        if r["kernel"] == name and tuple(sorted(r["tiles"].items())) == tiles
    ]
    label = f"backward {name} c4 float16 sm90 {r['tiles']}"
    _check_resources(r, label)
    assert r["ptx_mma"] > 0 and r["sass_mma"] > 0, f"{label}: no tensor-core MMA: {r}"
    vectors = r["ptx_v4_loads"] + r["ptx_cp_async_16"]
    assert vectors >= 4 and r["sass_128_loads"] >= 4, f"{label}: no 16-byte gathers: {r}"
    assert r["seconds"] < COMPILE_S, f"{label}: {r['seconds']} s to compile"


if __name__ == "__main__":
    print(json.dumps({"forward": forward_reports, "backward": backward_reports}[sys.argv[1]]()))
