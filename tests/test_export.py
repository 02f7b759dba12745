"""Deployment: ONNX export of mdconv (op and model level, run in ONNX Runtime), the mdpool error,
tools/deploy/export_model.py, torch.export (.pt2) and AOTInductor, each against eager PyTorch."""

import importlib.util
import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import projects_dcnv2.export as E
from projects_dcnv2.layers import DeformRoIPool, ModulatedDeformConv2d, ModulatedDeformConv2dPack

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (requirements.txt)")
import onnx  # noqa: E402  (after the skip: both come from requirements.txt)

from builders import QUICK, REPO, SMALL  # noqa: E402  (SMALL keeps every detection: something to compare)


def _session(model_proto):
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(
        model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _run(session, *tensors):
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), tensors)}
    return [torch.from_numpy(a) for a in session.run(None, feed)]


# ----------------------------------------------------------------------------------------------
# Op level: modulated_deform_conv2d -> DeformConv, random offsets (many samples outside the map)

# (C_in, C_out, kernel, stride, padding, dilation, groups, deformable_groups, bias, batch)
CASES = {
    "plain": (4, 6, 3, 1, 1, 1, 1, 1, True, 2),
    "stride2": (4, 6, 3, 2, 1, 1, 1, 1, False, 1),
    "pad0_stride21": (4, 6, 3, (2, 1), 0, 1, 1, 1, True, 2),
    "dilation2": (4, 6, 3, 1, 2, 2, 1, 1, True, 1),
    "groups2": (4, 6, 3, 1, 1, 1, 2, 1, False, 2),
    "dg3_kernel32": (6, 4, (3, 2), 1, (1, 0), 1, 1, 3, True, 2),
    "dg4_groups2": (8, 6, 3, 2, 1, 1, 2, 4, True, 1),
    "kernel15_dg4": (8, 4, (1, 5), 1, (0, 2), (1, 2), 1, 4, False, 2),
}


class _Explicit(torch.nn.Module):
    """A ModulatedDeformConv2d whose offsets and mask are graph inputs."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.conv = ModulatedDeformConv2d(*args, **kwargs)

    def forward(self, x, offset, mask):
        return self.conv(x, offset, mask)


def _case_inputs(conv, batch, h=9, w=8):
    x = torch.randn(batch, conv.in_channels, h, w)
    ho = (
        h + 2 * conv.padding[0] - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1
    ) // conv.stride[0] + 1
    wo = (
        w + 2 * conv.padding[1] - conv.dilation[1] * (conv.kernel_size[1] - 1) - 1
    ) // conv.stride[1] + 1
    fields = conv.deformable_groups * conv.num_taps
    offset = 3.0 * torch.randn(batch, 2 * fields, ho, wo)  # up to ~10 px: many taps land outside
    mask = torch.rand(batch, fields, ho, wo)
    return x, offset, mask


@pytest.mark.parametrize("name", list(CASES))
def test_mdconv_exports_to_deform_conv_and_matches(name):
    torch.manual_seed(0)
    c_in, c_out, k, stride, pad, dil, groups, dg, bias, batch = CASES[name]
    module = _Explicit(c_in, c_out, k, stride, pad, dil, groups, dg, bias).eval()
    if bias:
        torch.nn.init.normal_(module.conv.bias)
    args = _case_inputs(module.conv, batch)
    proto = E.export_onnx(module, args)
    assert [n.op_type for n in proto.graph.node] == ["DeformConv"]
    assert proto.ir_version == 9  # the oldest IR version with opset 19: ONNX Runtime 1.31 reads it
    (got,) = _run(_session(proto), *args)
    torch.testing.assert_close(got, module(*args), rtol=1e-5, atol=1e-5)


def test_dynamic_batch_height_width():
    torch.manual_seed(0)
    module = ModulatedDeformConv2dPack(4, 8, 3, stride=2, padding=1, deformable_groups=2).eval()
    torch.nn.init.normal_(module.conv_offset.weight, std=0.5)
    torch.nn.init.normal_(module.conv_offset.bias, std=2.0)
    dims = {
        0: torch.export.Dim("batch"),
        2: torch.export.Dim("h", min=3),
        3: torch.export.Dim("w", min=3),
    }
    proto = E.export_onnx(module, (torch.randn(2, 4, 12, 10),), dynamic_shapes={"x": dims})
    session = _session(proto)
    for shape in [(2, 4, 12, 10), (1, 4, 7, 15), (3, 4, 16, 5)]:
        x = torch.randn(shape)
        (got,) = _run(session, x)
        torch.testing.assert_close(got, module(x), rtol=1e-5, atol=1e-5)


def test_translation_table_with_torch_onnx_export_directly():
    # The documented user path without export_onnx: only the IR version needs lowering.
    torch.manual_seed(0)
    module = ModulatedDeformConv2dPack(4, 4, 3, padding=1).eval()
    torch.nn.init.normal_(module.conv_offset.weight, std=0.5)
    x = torch.randn(1, 4, 8, 8)
    program = torch.onnx.export(
        module,
        (x,),
        dynamo=True,
        opset_version=19,
        custom_translation_table=E.ONNX_TRANSLATIONS,
        verbose=False,
    )
    proto = E.fix_ir_version(program.model_proto)
    (got,) = _run(_session(proto), x)
    torch.testing.assert_close(got, module(x), rtol=1e-5, atol=1e-5)


def test_torchscript_exporter_symbolic():
    torch.manual_seed(0)
    module = ModulatedDeformConv2dPack(4, 6, 3, padding=1, deformable_groups=2, bias=False).eval()
    torch.nn.init.normal_(module.conv_offset.weight, std=0.5)
    x = torch.randn(2, 4, 9, 7)
    f = io.BytesIO()
    torch.onnx.export(
        module,
        (x,),
        f,
        dynamo=False,
        opset_version=19,
        input_names=["x"],
        dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}},
    )
    proto = onnx.load_from_string(f.getvalue())
    assert "DeformConv" in [n.op_type for n in proto.graph.node]
    session = _session(proto)
    for x in (torch.randn(2, 4, 9, 7), torch.randn(1, 4, 6, 11)):
        (got,) = _run(session, x)
        torch.testing.assert_close(got, module(x), rtol=1e-5, atol=1e-5)


def test_opset_below_19_is_refused():
    module = ModulatedDeformConv2dPack(4, 4, 3, padding=1).eval()
    with pytest.raises(ValueError, match=r"opset_version: .*DeformConv.*opset >= 19; got 18"):
        E.export_onnx(module, (torch.randn(1, 4, 8, 8),), opset_version=18)


def test_mdpool_raises_the_documented_error():
    class Pool(torch.nn.Module):
        def forward(self, x, rois, offset):
            return DeformRoIPool(2, 1.0, 2)(x, rois, offset)

    args = (
        torch.randn(1, 3, 8, 8),
        torch.tensor([[0.0, 1.0, 1.0, 6.0, 5.0]]),
        torch.zeros(1, 2, 2, 2),
    )
    with pytest.raises(E.UnsupportedOperatorError, match="deform_roi_pool .*torch.export"):
        E.export_onnx(Pool(), args)
    with pytest.raises(E.UnsupportedOperatorError, match="deform_roi_pool"):
        torch.onnx.export(Pool(), args, io.BytesIO(), dynamo=False, opset_version=19)


def test_export_module_needs_no_detectron2():
    code = (
        "import sys; sys.modules['detectron2'] = None\n"  # any detectron2 import now fails
        "import torch, projects_dcnv2.export as E\n"
        "from projects_dcnv2.layers import ModulatedDeformConv2dPack\n"
        "proto = E.export_onnx(ModulatedDeformConv2dPack(2, 2, 3, padding=1).eval(), (torch.randn(1, 2, 5, 5),))\n"
        "print([n.op_type for n in proto.graph.node if n.op_type == 'DeformConv'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "['DeformConv']"


# ----------------------------------------------------------------------------------------------
# Model level: tools/deploy/export_model.py on the quick configs (random weights, deformed offsets)


@pytest.fixture(scope="module")
def tool():
    pytest.importorskip("detectron2", reason="the model-level export needs detectron2")
    spec = importlib.util.spec_from_file_location(
        "export_model", REPO / "tools" / "deploy" / "export_model.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sample_image(tmp_path_factory):
    rng = np.random.default_rng(0)
    image = np.zeros((96, 80, 3), np.uint8) + rng.integers(0, 60, (96, 80, 3), dtype=np.uint8)
    image[20:60, 15:50] = (200, 40, 40)  # something for the detector to find
    path = tmp_path_factory.mktemp("sample") / "sample.png"
    Image.fromarray(image).save(path)
    return str(path)


def _random_weights(tool, config, folder):
    """A checkpoint of the config's model whose offset convs are random (so the sampling is deformed)."""
    from projects_dcnv2 import load_dcnv2_config
    from projects_dcnv2.engine import build_inference_model

    torch.manual_seed(0)
    model = build_inference_model(load_dcnv2_config(str(QUICK / config), SMALL))
    for name, param in model.named_parameters():
        if "offset" in name:
            torch.nn.init.normal_(param, std=0.02)
    path = folder / "random.pth"
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def _tool_argv(config, sample_image, output, *opts):
    return ["--config-file", config, "--format", "onnx", "--sample-image", sample_image,
            "--output", str(output), *SMALL, *opts]  # fmt: skip


def _fpn_tolerance(reference):
    """Float32 rounding of these GroupNorm networks: eager float32 is up to 1.3e-5 x the largest
    feature away from float64 (measured on the tiny backbone below), and a different summation
    order (ONNX Runtime, inductor) adds as much again."""
    return 3e-5 * max(1.0, max(r.abs().max().item() for r in reference))


def test_tool_exports_mdconv_mask_rcnn_to_onnx(tool, sample_image, tmp_path):
    weights = _random_weights(tool, "mask_rcnn_R50_FPN_mdconv_shapes.yaml", tmp_path)
    config = str(QUICK / "mask_rcnn_R50_FPN_mdconv_shapes.yaml")
    result = tool.main(_tool_argv(config, sample_image, tmp_path, "MODEL.WEIGHTS", weights))
    assert (tmp_path / "backbone.onnx").is_file() and (tmp_path / "model.onnx").is_file()

    # Independently of the tool's own check: rebuild the model and run both files in ONNX Runtime.
    from projects_dcnv2 import load_dcnv2_config
    from projects_dcnv2.engine import build_inference_model

    cfg = load_dcnv2_config(config, [*SMALL, "MODEL.WEIGHTS", weights])
    model = build_inference_model(cfg)
    inputs = tool.get_sample_inputs(cfg, sample_image)
    assert (
        model.backbone.bottom_up.res3[0].conv2_offset.weight.abs().sum() > 0
    )  # deformed, not a grid
    x = tool.backbone_input(model, inputs)
    with torch.no_grad():
        fpn = list(model.backbone(x).values())
    backbone = onnx.load(str(tmp_path / "backbone.onnx"))
    assert (
        sum(n.op_type == "DeformConv" for n in backbone.graph.node) == 13
    )  # c3-c5: 4 + 6 + 3 blocks
    got = _run(_session(backbone), x)
    assert len(got) == len(fpn) == 5
    for g, r in zip(got, fpn):
        torch.testing.assert_close(g, r, rtol=0, atol=_fpn_tolerance(fpn))
    assert max(result["backbone"][1]) <= _fpn_tolerance(fpn)

    # Whole model: the same detections (boxes, classes, scores, masks) from PyTorch and ONNX Runtime.
    with torch.no_grad():
        expected = model.inference([{"image": inputs[0]["image"]}], do_postprocess=False)[0]
    adapter = tool.tracing_adapter(model, inputs)
    with torch.no_grad():
        adapter(inputs[0]["image"])  # records the output schema
    runner = tool.load_exported(str(tmp_path / "model.onnx"))
    instances = adapter.outputs_schema(runner(inputs[0]["image"]))[0]["instances"]
    assert len(expected) > 0 and len(instances) == len(expected)
    torch.testing.assert_close(
        instances.pred_boxes.tensor, expected.pred_boxes.tensor, rtol=0, atol=1e-3
    )
    assert torch.equal(instances.pred_classes, expected.pred_classes)
    torch.testing.assert_close(instances.scores, expected.scores, rtol=0, atol=1e-5)
    torch.testing.assert_close(instances.pred_masks, expected.pred_masks, rtol=0, atol=1e-5)

    # --run-eval's wrapper: detections rescaled to the original 96 x 80 image, as model(inputs) does.
    assert inputs[0]["image"].shape[1:] != (inputs[0]["height"], inputs[0]["width"])
    with torch.no_grad():
        full = model(inputs)[0]["instances"]
    wrapped = tool.ExportedRCNN(runner, adapter)(inputs)[0]["instances"]
    assert wrapped.image_size == full.image_size == (96, 80)
    torch.testing.assert_close(wrapped.pred_boxes.tensor, full.pred_boxes.tensor, rtol=0, atol=2e-3)
    torch.testing.assert_close(wrapped.scores, full.scores, rtol=0, atol=1e-5)
    assert (
        wrapped.pred_masks != full.pred_masks
    ).float().mean() < 1e-3  # pasted, thresholded at 0.5


def test_tool_mdpool_exports_the_backbone_and_refuses_the_whole_model(tool, sample_image, tmp_path):
    config = str(QUICK / "faster_rcnn_R50_FPN_mdpool_shapes.yaml")
    with pytest.raises(SystemExit, match="whole model not exported: dcnv2::deform_roi_pool .*ONNX"):
        tool.main(_tool_argv(config, sample_image, tmp_path))
    assert (tmp_path / "backbone.onnx").is_file() and not (tmp_path / "model.onnx").exists()


# ----------------------------------------------------------------------------------------------
# torch.export (.pt2) and AOTInductor: a small mdconv ResNet-18-FPN backbone
R18 = [
    *SMALL, "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "32",
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "32", "MODEL.FPN.OUT_CHANNELS", "32",
    "MODEL.RESNETS.DEFORM_NUM_GROUPS", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_backbone(tool):
    from projects_dcnv2 import load_dcnv2_config
    from projects_dcnv2.engine import build_inference_model

    torch.manual_seed(0)
    cfg = load_dcnv2_config(str(QUICK / "mask_rcnn_R50_FPN_mdconv_shapes.yaml"), R18)
    model = build_inference_model(cfg)
    for name, param in model.backbone.named_parameters():
        if "offset" in name:
            torch.nn.init.normal_(param, std=0.05)
    return model


def _check_backbone_file(tool, model, path):
    runner = tool.load_exported(path)
    for shape in [
        (1, 3, 96, 160),
        (2, 3, 128, 96),
    ]:  # batch, height and width differ from the trace
        x = torch.randn(shape)
        with torch.no_grad():
            expected = list(model.backbone(x).values())
            got = runner(x)
        assert len(got) == len(expected) == 5
        for g, r in zip(got, expected):
            torch.testing.assert_close(g, r, rtol=0, atol=_fpn_tolerance(expected))


def test_torch_export_round_trip(tool, tiny_backbone, tmp_path):
    path = tool.export_backbone(tiny_backbone, torch.randn(1, 3, 64, 64), "pt2", str(tmp_path))
    program = torch.export.load(path)
    assert any(
        n.target is torch.ops.dcnv2.modulated_deform_conv2d.default for n in program.graph.nodes
    )
    _check_backbone_file(tool, tiny_backbone, path)


def _cpp_toolchain():
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except Exception as e:  # noqa: BLE001  (any failure means inductor cannot compile here)
        return f"unavailable ({e})"


@pytest.mark.skipif(
    _cpp_toolchain().startswith("unavailable"),
    reason=f"AOTInductor needs inductor's C++ toolchain: {_cpp_toolchain()}",
)
def test_aoti_package_runs_and_matches(tool, tiny_backbone, tmp_path):
    path = tool.export_backbone(tiny_backbone, torch.randn(1, 3, 64, 64), "aoti", str(tmp_path))
    assert path.endswith("backbone_aoti.pt2")
    _check_backbone_file(tool, tiny_backbone, path)
