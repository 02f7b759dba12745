"""What the benchmark tools share: timing rounds, the ratio of two timed cases with its spread and
its check against the ratio of medians, peak memory, and the machine header of a JSON file.

A ratio here is always the median of per-round ratios (the two cases of a round ran back to back,
so a noisy spell of a shared machine hits both). ``ratio_stats`` reports it with the 25-75% range
of the per-round ratios and with the ratio of the two medians; when the ratio of medians lies
outside that range (widened by ``AGREEMENT_TOLERANCE``), the rounds disagree with each other too
much for either figure to be quoted: ``agrees`` is False and the pages print "too noisy".

Imported by tools/benchmark_ops.py, tools/benchmark_model.py and tools/profile_model.py (each runs
as a script, so this module is found beside it on sys.path).
"""

import os
import platform
import statistics
import time

GB = 2**30
# Relative slack around the 25-75% range of the per-round ratios within which the ratio of the
# medians still agrees (rounding, and the quartiles of two or three rounds being the rounds).
AGREEMENT_TOLERANCE = 0.01


def sync(device):
    """Waits for the device's queued work (CUDA); nothing on CPU."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def once(fn, device):
    """Wall-clock seconds of one call of ``fn``, the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def time_rounds(fns, device, repeat, warmup=2, rotate=False):
    """``warmup`` untimed calls of each function, then ``repeat`` rounds, one timed call of each
    per round (in rotating order with ``rotate``), so that load on a shared machine hits all of
    them alike. Returns {key: [seconds per round]}."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    keys = list(fns)
    times = {key: [] for key in keys}
    for r in range(repeat):
        order = keys[r % len(keys) :] + keys[: r % len(keys)] if rotate else keys
        for key in order:
            times[key].append(once(fns[key], device))
    return times


def quantile(values, q):
    """The ``q`` quantile (0..1) of ``values`` by linear interpolation between order statistics
    (numpy's default, "inclusive"): the min at 0, the median at 0.5, the max at 1."""
    if not values:
        raise ValueError("quantile: expected at least one value, got none")
    if not 0 <= q <= 1:
        raise ValueError(f"quantile: expected q in [0, 1], got {q}")
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def ratio_stats(times, base_times):
    """The ratio of ``times`` to ``base_times`` (seconds of the same rounds, round by round):

    - ``ratio``: the median of the per-round ratios;
    - ``ratio_q25``, ``ratio_q75``, ``ratio_min``, ``ratio_max``: their spread over the rounds;
    - ``ratio_of_medians``: median(times) / median(base_times);
    - ``agrees``: whether ``ratio_of_medians`` lies in [q25, q75] widened by
      ``AGREEMENT_TOLERANCE`` (relative); when False the figure is too noisy to quote.
    """
    if len(times) != len(base_times) or not times:
        raise ValueError(
            f"ratio_stats: expected two equal, non-empty lists of round times, got {len(times)} "
            f"and {len(base_times)}"
        )
    per_round = [a / b for a, b in zip(times, base_times)]
    q25, q75 = quantile(per_round, 0.25), quantile(per_round, 0.75)
    of_medians = statistics.median(times) / statistics.median(base_times)
    slack = AGREEMENT_TOLERANCE * abs(statistics.median(per_round))
    return {
        "ratio": statistics.median(per_round),
        "ratio_q25": q25,
        "ratio_q75": q75,
        "ratio_min": min(per_round),
        "ratio_max": max(per_round),
        "ratio_of_medians": of_medians,
        "agrees": q25 - slack <= of_medians <= q75 + slack,
    }


def ratio_entry(prefix, times, base_times):
    """``ratio_stats`` flattened under ``prefix`` for a JSON row: {prefix: ratio,
    prefix + "_q25": ..., ..., prefix + "_agrees": ...}."""
    stats = ratio_stats(times, base_times)
    names = {k: prefix + k[len("ratio") :] for k in stats if k.startswith("ratio")}
    names["agrees"] = f"{prefix}_agrees"
    return {names[k]: v for k, v in stats.items()}


def format_ratio(entry, prefix="ratio", digits=2):
    """A ratio for a page: "1.08x (1.02-1.11)" with its 25-75% range, or "too noisy (median of
    rounds 1.08x, of medians 0.93x)" when the JSON says it disagrees with its own medians. Entries
    written before the spread was recorded print the bare ratio."""
    value = entry[prefix]
    if f"{prefix}_q25" not in entry:
        return f"{value:.{digits}f}x"
    if not entry[f"{prefix}_agrees"]:
        return (
            f"too noisy (rounds {value:.{digits}f}x, "
            f"medians {entry[f'{prefix}_of_medians']:.{digits}f}x)"
        )
    return (
        f"{value:.{digits}f}x ({entry[f'{prefix}_q25']:.{digits}f}-"
        f"{entry[f'{prefix}_q75']:.{digits}f})"
    )


def cpu_name():
    """The CPU's model name from /proc/cpuinfo, else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device):
    """The machine line of a JSON file: the GPU's name and memory, or the CPU's name and the
    number of threads PyTorch uses."""
    import torch

    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return f"{torch.cuda.get_device_name()} ({props.total_memory / GB:.0f} GB)"
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def header(device):
    """The fields every benchmark JSON starts with: machine, device, library versions, date."""
    import torch
    import torchvision

    return {
        "machine": machine(device),
        "device": device,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "commit": _commit(),
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def _commit():
    """The checkout's commit (with "+changes" when the tree differs from it), or None."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return None
    return (commit + ("+changes" if dirty else "")) or None


def peak_bytes_above(fn, device):
    """(result of ``fn()``, peak bytes allocated while it ran above what was allocated before);
    the peak is None off CUDA."""
    if device != "cuda":
        return fn(), None
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    return result, torch.cuda.max_memory_allocated() - base


def kernel_ms(fn, device, calls=10):
    """Milliseconds of device kernel time per call of ``fn`` (CUDA: the kernels' durations from
    ``torch.profiler`` over ``calls`` back-to-back calls, host time left out); None on CPU, where
    only the per-call wall time exists."""
    if device != "cuda":
        return None
    import torch
    from torch.profiler import ProfilerActivity

    fn()
    torch.cuda.synchronize()
    # CPU activity too: the kernels' durations are summed over the host ops that launched them
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    device_us = sum(e.self_device_time_total for e in prof.events() if e.device_type.name == "CPU")
    return device_us / 1e3 / calls
