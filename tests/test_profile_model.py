"""The benchmark tools' shared parts and the profile tool, at tiny sizes on CPU:
tools/bench_utils.py (ratio, spread and agreement against hand-computed numbers),
tools/profile_model.py (its kinds of work add up, and land where they belong),
tools/benchmark_model.py's torchvision peer (the same outputs as our op)."""

import argparse
import importlib.util
import sys

import pytest
import torch

from projects_dcnv2.layers import ModulatedDeformConv2dPack

from builders import NARROW, REPO, SMALL, make_model


def _load_tool(name):
    sys.path.insert(0, str(REPO / "tools"))  # the tools import bench_utils beside them
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_tool("bench_utils")


# ------------------------------------------------------------------------------- bench_utils
def test_ratio_stats_against_hand_computed_numbers():
    # per-round ratios 2, 3, 2.5: median 2.5; quartiles (linear) 2.25 and 2.75
    # medians 3 / 1 = 3.0: outside [2.25, 2.75] (+- 1% of 2.5): too noisy
    stats = bench.ratio_stats([2.0, 3.0, 10.0], [1.0, 1.0, 4.0])
    assert stats["ratio"] == pytest.approx(2.5)
    assert (stats["ratio_q25"], stats["ratio_q75"]) == (pytest.approx(2.25), pytest.approx(2.75))
    assert (stats["ratio_min"], stats["ratio_max"]) == (pytest.approx(2.0), pytest.approx(3.0))
    assert stats["ratio_of_medians"] == pytest.approx(3.0)
    assert stats["agrees"] is False
    # per-round 1.0, 1.2, 1.1, 1.3: median 1.15, quartiles 1.075 and 1.225; medians 1.1 / 1 = 1.1
    stats = bench.ratio_stats([1.0, 1.2, 1.1, 1.3], [1.0, 1.0, 1.0, 1.0])
    assert stats["ratio"] == pytest.approx(1.15)
    assert (stats["ratio_q25"], stats["ratio_q75"]) == (pytest.approx(1.075), pytest.approx(1.225))
    assert stats["ratio_of_medians"] == pytest.approx(1.15) and stats["agrees"] is True
    # like the Faster mdconv row of the 2026-12-04 run: the rounds say 8% slower (62 / 57.5), the
    # medians 4% faster (62 / 64.8): one round where the twin was slow decides the medians
    stats = bench.ratio_stats([61.5, 70, 55, 62, 71], [57, 64.8, 66.3, 57.5, 66])
    assert stats["ratio"] == pytest.approx(62 / 57.5)
    assert stats["ratio_of_medians"] == pytest.approx(62 / 64.8)
    assert stats["ratio_q25"] == pytest.approx(71 / 66) and not stats["agrees"]


def test_ratio_entry_and_format():
    entry = bench.ratio_entry("ratio", [1.3, 1.1, 1.2, 1.0, 1.4], [1.0] * 5)
    assert set(entry) == {
        "ratio", "ratio_q25", "ratio_q75", "ratio_min", "ratio_max", "ratio_of_medians",
        "ratio_agrees",
    }  # fmt: skip
    assert bench.format_ratio(entry) == "1.20x (1.10-1.30)"
    noisy = bench.ratio_entry("tv", [2.0, 3.0, 10.0], [1.0, 1.0, 4.0])
    assert noisy["tv_agrees"] is False
    assert bench.format_ratio(noisy, "tv") == "too noisy (rounds 2.50x, medians 3.00x)"
    assert bench.format_ratio({"ratio": 1.234}) == "1.23x"  # older files: no spread recorded


def test_ratio_stats_rejects_bad_input():
    with pytest.raises(ValueError, match="equal, non-empty lists of round times, got 2 and 1"):
        bench.ratio_stats([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="expected q in \\[0, 1\\], got 2"):
        bench.quantile([1.0], 2)


def test_time_rounds_rotates_and_counts():
    calls = []
    times = bench.time_rounds(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        "cpu",
        repeat=3,
        warmup=1,
        rotate=True,
    )
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert [len(t) for t in times.values()] == [3, 3]


# ------------------------------------------------------------------------------- profile_model
profile_model = _load_tool("profile_model")


def test_categorize_links_backward_to_the_forward_scopes():
    """A DCN Pack module and a plain conv, forward and backward under the profiler: the offset
    conv's backward is an offset_conv, the plain conv's an other_conv, our op's a mdconv."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1), ModulatedDeformConv2dPack(4, 4, 3, padding=1)
    )
    assert profile_model.add_scopes(model) == 1
    x = torch.randn(1, 2, 6, 6, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(x).sum().backward()
    events = list(prof.events())
    category = profile_model.categorize(events)
    seen = {}
    for e in events:
        if e.name in ("aten::convolution_backward", "aten::convolution") or e.name.startswith(
            "dcnv2::"
        ):
            seen.setdefault(e.name, []).append(category[id(e)])
    assert sorted(seen["aten::convolution"]) == ["offset_conv", "other_conv"]
    assert sorted(seen["aten::convolution_backward"]) == ["offset_conv", "other_conv"]
    assert {c for n, cs in seen.items() if n.startswith("dcnv2::") for c in cs} == {"mdconv"}
    assert any("backward" in n for n in seen if n.startswith("dcnv2::"))
    split = [category[id(e)] for e in events if e.name in ("aten::split", "aten::sigmoid")]
    assert split and set(split) == {"dcn_small_ops"}


def test_profile_tool_adds_up_and_separates_the_twin(tmp_path):
    args = argparse.Namespace(
        device="cpu", size="64x96", ims_per_batch=2, objects=2, warmup=1, iters=1,
        opts=[*SMALL, *NARROW], proposals_per_object=3, nms_candidates=0,
    )  # fmt: skip
    dcn = profile_model.profile_spec("faster_rcnn_R50_FPN_mdconv", "mdconv", args)
    twin = profile_model.profile_spec("faster_rcnn_R50_FPN", "twin", args)
    assert dcn["dcn_layers"] == 4 + 6 + 3 and twin["dcn_layers"] == 0  # c3-c5 of ResNet-50
    for result in (dcn, twin):
        for phase in ("backbone", "train"):
            p = result[phase]
            cats = p["categories"]
            assert set(cats) == set(profile_model.CATEGORIES)
            for key in ("kernel_ms", "host_ms", "launches"):
                assert sum(c[key] for c in cats.values()) == pytest.approx(p["total"][key])
            # the ops' self CPU time covers the profiled wall time (Python between ops included)
            assert 0.85 * p["wall_ms"] <= p["total"]["host_ms"] <= 1.01 * p["wall_ms"], p
            assert p["gpu_idle_ms"] is None
    for phase in ("backbone", "train"):
        d, t = dcn[phase]["categories"], twin[phase]["categories"]
        for kind in ("mdconv", "offset_conv", "dcn_small_ops"):
            assert d[kind]["kernel_ms"] > 0 and d[kind]["launches"] > 0, (phase, kind)
            assert t[kind] == {"kernel_ms": 0.0, "host_ms": 0.0, "launches": 0.0}, (phase, kind)
        assert t["other_conv"]["kernel_ms"] > 0 and d["other_conv"]["kernel_ms"] > 0


# ----------------------------------------------------------------- benchmark_model's peer row
benchmark_model = _load_tool("benchmark_model")


def test_torchvision_peer_gives_our_outputs():
    """The mdconv backbone with torchvision's deform_conv2d swapped in, the same weights and
    random (not zero) offsets and masks: the same features as our op, to float tolerance."""
    _, model = make_model("faster_rcnn_R50_FPN_mdconv", *SMALL, *NARROW)
    _, peer = make_model("faster_rcnn_R50_FPN_mdconv", *SMALL, *NARROW, seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "conv2_offset" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peer.load_state_dict(model.state_dict())
    assert benchmark_model.use_torchvision_deform_conv(peer) == 13
    model.eval(), peer.eval()
    x = torch.randn(1, 3, 64, 96, generator=g) * 50
    with torch.no_grad():
        ours, theirs = model.backbone(x), peer.backbone(x)
    for key in ours:
        scale = ours[key].abs().max()
        assert scale > 0
        torch.testing.assert_close(theirs[key], ours[key], atol=1e-4 * scale, rtol=1e-4)
    offsets = [m for n, m in model.named_modules() if n.endswith("conv2_offset")]
    assert offsets[0](torch.randn(1, offsets[0].in_channels, 8, 8)).abs().max() > 0.1


def test_limit_nms_candidates_keeps_the_top_k():
    """The wrapped predictor passes exactly k (class, box) pairs of an image to NMS, the k
    highest-scoring foreground ones (checked against a sort)."""
    _, model = make_model("faster_rcnn_R50_FPN", *SMALL, *NARROW)
    predictor = model.roi_heads.box_predictor
    counts = []
    benchmark_model.limit_nms_candidates(predictor, 37, counts)
    g = torch.Generator().manual_seed(0)
    num_classes = predictor.num_classes
    logits = torch.randn(10, num_classes + 1, generator=g)
    deltas = torch.zeros(10, 4 * num_classes)
    from detectron2.structures import Boxes, Instances

    props = Instances((64, 96))
    props.proposal_boxes = Boxes(torch.tensor([[1.0, 2, 30, 40]]).repeat(10, 1))
    predictor.inference((logits, deltas), [props])
    assert counts == [37]
    scores = logits.softmax(-1)[:, :-1].flatten().sort(descending=True).values
    assert scores[36] > predictor.test_score_thresh >= scores[37]
    # ties with the k-th pass together: a threshold cannot split them
    logits[:] = 0.0
    predictor.inference((logits, deltas), [props])
    assert counts[-1] == 10 * num_classes


# ------------------------------------------------------------- benchmark_ops --host-overhead
def test_benchmark_ops_host_overhead_mode(tmp_path):
    """The tiny-call mode's rows (figures are not checked: the coordinator records them): every
    implementation and mode, per-call microseconds, each ratio within its own spread."""
    ops = _load_tool("benchmark_ops")
    threads = torch.get_num_threads()
    try:
        out = tmp_path / "host.json"
        ops.main(["--host-overhead", "--calls", "3", "--repeat", "3", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    import json

    result = json.loads(out.read_text())
    rows = [r for r in result["host_overhead"] if r["device"] == "cpu"]
    assert [r["mode"] for r in rows] == ["grad", "no_grad", "inference_mode"]
    for r in rows:
        assert min(r["conv2d_us"], r["ours_us"], r["torchvision_us"]) > 0
        for name in ("ours/conv2d", "torchvision/ours"):
            assert r[f"{name}_min"] <= r[f"{name}_q25"] <= r[name] <= r[f"{name}_q75"]
            assert r[f"{name}_q75"] <= r[f"{name}_max"]
    assert "one thread" in result["timing"] and result["machine"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_profile_tool_on_cuda_sees_kernels():
    """On CUDA: kernel time and launches of the device's kernels, the GPU's idle time between
    them, and bench_utils' kernel time of one conv below its synchronised wall time."""
    args = argparse.Namespace(
        device="cuda", size="64x96", ims_per_batch=2, objects=2, warmup=1, iters=2,
        opts=[*SMALL, *NARROW, "MODEL.DEVICE", "cuda"], proposals_per_object=3, nms_candidates=0,
    )  # fmt: skip
    dcn = profile_model.profile_spec("faster_rcnn_R50_FPN_mdconv", "mdconv", args)
    for phase in ("backbone", "train"):
        p = dcn[phase]
        assert p["categories"]["mdconv"]["kernel_ms"] > 0
        assert p["categories"]["mdconv"]["launches"] >= 13
        assert p["gpu_idle_ms"] is not None and 0 <= p["gpu_idle_ms"] <= p["wall_ms"]
        assert 0 < p["total"]["kernel_ms"] <= p["wall_ms"]
    x = torch.randn(1, 64, 32, 32, device="cuda")
    w = torch.randn(64, 64, 3, 3, device="cuda")
    kernel = bench.kernel_ms(lambda: torch.nn.functional.conv2d(x, w, padding=1), "cuda")
    wall = 1e3 * min(
        bench.once(lambda: torch.nn.functional.conv2d(x, w, padding=1), "cuda") for _ in range(5)
    )
    assert 0 < kernel <= wall
