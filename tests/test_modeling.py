"""DCNv2 backbone blocks, the mdpool pooler, and one CPU training / inference step per seed
config at a reduced input size."""

import pytest
import torch
import torch.nn.functional as F

from detectron2.modeling.backbone.resnet import BottleneckBlock
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage

from projects_dcnv2.layers import ModulatedDeformRoIPoolPack
from projects_dcnv2.modeling import (
    MDPoolROIPooler,
    ModulatedDeformBasicBlock,
    ModulatedDeformBottleneckBlock,
)

from builders import PLAIN_TWINS, SEED_CONFIGS, SMALL, make_model, training_batch


def build(name, *opts):
    """A seed config's model at full width (the architecture under test), small run-time knobs."""
    return make_model(name, *SMALL, *opts)


# --------------------------------------------------------------------------------- backbone
@pytest.mark.parametrize(
    "name, dg", [("faster_rcnn_R50_FPN_mdconv", 1), ("faster_rcnn_R50_FPN_mdconv_dg4", 4)]
)
def test_mdconv_r50_has_13_deformable_blocks_in_c3_c5(name, dg):
    _, model = build(name)
    resnet = model.backbone.bottom_up
    for stage, count, width in [
        ("res2", 0, 64),
        ("res3", 4, 128),
        ("res4", 6, 256),
        ("res5", 3, 512),
    ]:
        blocks = list(getattr(resnet, stage).children())
        deformable = [b for b in blocks if isinstance(b, ModulatedDeformBottleneckBlock)]
        assert len(deformable) == count == (len(blocks) if count else 0)
        for index, block in enumerate(deformable):
            stride = 2 if index == 0 else 1  # pytorch style: the stride sits on the 3x3
            assert block.conv2_offset.out_channels == 3 * dg * 3 * 3
            assert block.conv2_offset.in_channels == width
            assert tuple(block.conv2_offset.stride) == (stride, stride)
            assert block.conv2_offset.weight.abs().sum() == 0
            assert block.conv2_offset.bias.abs().sum() == 0
            assert tuple(block.conv1.stride) == (1, 1)
            assert block.conv2.weight.shape == (width, width, 3, 3)
    n = sum(isinstance(m, ModulatedDeformBottleneckBlock) for m in model.modules())
    assert n == 13
    # Checkpoint keys that MMDetection's layerL.B.conv2(.conv_offset) / bnK map onto
    # (docs/semantics.md, "MMDetection checkpoints").
    keys = model.state_dict()
    assert keys["backbone.bottom_up.res3.0.conv2_offset.weight"].shape == (27 * dg, 128, 3, 3)
    assert keys["backbone.bottom_up.res5.2.conv2_offset.bias"].shape == (27 * dg,)
    assert "backbone.bottom_up.res4.5.conv2.norm.running_var" in keys
    assert "backbone.bottom_up.res3.0.conv2.bias" not in keys
    assert "backbone.bottom_up.res3.0.shortcut.norm.weight" in keys


def _bottleneck(stride, dg=1, norm=""):
    torch.manual_seed(0)
    return ModulatedDeformBottleneckBlock(
        16, 32, bottleneck_channels=8, stride=stride, norm=norm, deform_num_groups=dg
    ).eval()


@pytest.mark.parametrize("stride", [1, 2])
def test_fresh_block_is_half_a_plain_bottleneck(stride):
    """Zero-initialised offsets sample the regular grid and the mask is sigmoid(0) = 0.5."""
    block = _bottleneck(stride)
    plain = BottleneckBlock(16, 32, bottleneck_channels=8, stride=stride, norm="").eval()
    state = {k: v for k, v in block.state_dict().items() if not k.startswith("conv2_offset")}
    state["conv2.weight"] = state["conv2.weight"] * 0.5
    plain.load_state_dict(state)
    x = torch.randn(2, 16, 9, 10)
    out = block(x)
    assert out.shape == (2, 32, (9 - 1) // stride + 1, (10 - 1) // stride + 1)
    torch.testing.assert_close(out, plain(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dg", [1, 2])
def test_offset_channels_are_dy_dx_per_tap_then_mask(dg):
    """Offset dy = +1 on every tap and mask logit +30 must equal a plain 3x3 conv of the input
    shifted up by one row (zero below): checks the [offset | mask] split and the (dy, dx) order."""
    block = _bottleneck(1, dg)
    conv_in = torch.randn(1, 8, 6, 7)
    taps = dg * 9
    with torch.no_grad():
        bias = torch.zeros(3 * taps)
        bias[0 : 2 * taps : 2] = 1.0  # dy of each (group, tap)
        bias[2 * taps :] = 30.0  # mask logits -> 1
        block.conv2_offset.bias.copy_(bias)
        expected = F.conv2d(F.pad(conv_in, (1, 1, 0, 2)), block.conv2.weight)
        torch.testing.assert_close(block._conv2(conv_in), expected, rtol=1e-4, atol=1e-5)


def test_deformable_basic_block_shapes_and_keys():
    torch.manual_seed(0)
    block = ModulatedDeformBasicBlock(16, 32, stride=2, norm="GN", deform_num_groups=2)
    out = block(torch.randn(2, 16, 8, 8))
    assert out.shape == (2, 32, 4, 4)
    assert block.conv2_offset.out_channels == 3 * 2 * 9
    assert {
        "conv1.weight",
        "conv2.weight",
        "conv2.norm.weight",
        "conv2_offset.weight",
        "shortcut.weight",
    } <= set(block.state_dict())


# ----------------------------------------------------------------------------------- mdpool
def test_mdpool_model_has_one_deformable_pool_per_level():
    _, model = build("faster_rcnn_R50_FPN_mdpool")
    pooler = model.roi_heads.box_pooler
    assert isinstance(pooler, MDPoolROIPooler)
    assert len(pooler.level_poolers) == 4
    for level, layer in enumerate(pooler.level_poolers):
        assert isinstance(layer, ModulatedDeformRoIPoolPack)
        assert layer.spatial_scale == pytest.approx(1.0 / 2 ** (level + 2))
    keys = model.state_dict()
    for level in range(4):
        prefix = f"roi_heads.box_pooler.level_poolers.{level}."
        assert keys[prefix + "offset_fc.0.weight"].shape == (1024, 256 * 7 * 7)
        assert keys[prefix + "offset_fc.2.weight"].shape == (1024, 1024)
        assert keys[prefix + "offset_fc.4.weight"].shape == (2 * 7 * 7, 1024)
        assert keys[prefix + "mask_fc.0.weight"].shape == (1024, 256 * 7 * 7)
        assert keys[prefix + "mask_fc.2.weight"].shape == (7 * 7, 1024)
    # The mask branch (Mask R-CNN) would keep Detectron2's ROIAlign; the box head is unchanged.
    assert model.roi_heads.box_head.fc1.in_features == 256 * 7 * 7


def _small_pooler():
    torch.manual_seed(0)
    return MDPoolROIPooler(7, [1 / 4, 1 / 8, 1 / 16, 1 / 32], 4, deform_fc_dim=16)


def _pyramid(n=2, size=256):
    return [torch.randn(n, 4, size // s, size // s) for s in (4, 8, 16, 32)]


def test_mdpool_pooler_assigns_levels_like_detectron2():
    pooler, x = _small_pooler(), _pyramid()
    # sqrt(area) 40 -> P2, 150 -> P3, 250 -> P4, 500 -> P5 (canonical 224 at level 4).
    boxes = [
        Boxes(torch.tensor([[10.0, 10, 50, 50], [0, 0, 150, 150]])),
        Boxes(torch.tensor([[5.0, 5, 255, 255], [0, 0, 500, 500]])),
    ]
    out = pooler(x, boxes)
    assert out.shape == (4, 4, 7, 7)
    rois = torch.tensor(
        [[0.0, 10, 10, 50, 50], [0, 0, 0, 150, 150], [1, 5, 5, 255, 255], [1, 0, 0, 500, 500]]
    )
    for i, level in enumerate([0, 1, 2, 3]):
        expected = pooler.level_poolers[level](x[level], rois[i : i + 1])
        torch.testing.assert_close(out[i : i + 1], expected)


def test_mdpool_pooler_handles_zero_boxes():
    pooler, x = _small_pooler(), _pyramid()
    empty = Boxes(torch.zeros(0, 4))
    assert pooler(x, [empty, empty]).shape == (0, 4, 7, 7)
    out = pooler(x, [empty, Boxes(torch.tensor([[1.0, 2, 60, 70]]))])
    assert out.shape == (1, 4, 7, 7)
    out.sum().backward()  # every level took part, so none breaks DDP's gradient reduction
    assert pooler([f[:0] for f in x], []).shape == (0, 4, 7, 7)  # no image at all


def test_mdpool_pooler_with_boxes_far_outside_the_image():
    pooler, x = _small_pooler(), _pyramid(1, 64)
    boxes = Boxes(torch.tensor([[900.0, 900, 940, 960], [-3000, -3000, -2000, -2000]]))
    out = pooler(x, [boxes])
    assert out.shape == (2, 4, 7, 7) and torch.count_nonzero(out) == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
def test_mdpool_pooler_pools_float64_as_is_and_half_in_float32(dtype):
    """Half precision features are pooled in float32 (MMDetection's force_fp32); a float64 model
    stays float64 end to end (its fcs are float64 too)."""
    pooler, x = _small_pooler(), _pyramid()
    boxes = [Boxes(torch.tensor([[10.0, 10, 50, 50]])), Boxes(torch.tensor([[0.0, 0, 150, 150]]))]
    reference = pooler(x, boxes)
    if dtype == torch.float64:
        pooler.double()
    out = pooler([f.to(dtype) for f in x], [Boxes(b.tensor.to(dtype)) for b in boxes])
    assert out.dtype == dtype
    tol = 1e-6 if dtype == torch.float64 else 2e-2
    torch.testing.assert_close(out.float(), reference, rtol=tol, atol=tol)


# ------------------------------------------------------------------ training and inference
@pytest.mark.parametrize("name", SEED_CONFIGS + PLAIN_TWINS)
def test_one_training_step_and_inference(name):
    cfg, model = build(name)
    seen_levels = set()
    if "mdpool" in name:
        for level, layer in enumerate(model.roi_heads.box_pooler.level_poolers):
            layer.register_forward_pre_hook(
                lambda _m, args, level=level: seen_levels.add(level) if len(args[1]) else None
            )
    model.train()
    with EventStorage():
        losses = model(training_batch(cfg.MODEL.MASK_ON))
    assert ("loss_mask" in losses) == cfg.MODEL.MASK_ON
    for key, value in losses.items():
        assert torch.isfinite(value), key
    sum(losses.values()).backward()

    offsets = [m.conv2_offset for m in model.modules() if hasattr(m, "conv2_offset")]
    assert len(offsets) == (13 if "mdconv" in name else 0)
    for conv in offsets:  # zero-initialised, yet its weight gets a gradient at once
        assert torch.isfinite(conv.weight.grad).all() and conv.weight.grad.abs().sum() > 0
    if "mdpool" in name:
        assert 0 in seen_levels
        for level in seen_levels:
            layer = model.roi_heads.box_pooler.level_poolers[level]
            # The last (zero-initialised) layers get the first gradient.
            for linear in (layer.offset_fc[4], layer.mask_fc[2]):
                assert torch.isfinite(linear.weight.grad).all()
                assert linear.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        (result,) = model([{"image": torch.rand(3, 100, 120) * 255, "height": 200, "width": 240}])
    instances = result["instances"]
    assert instances.image_size == (200, 240)
    assert len(instances) > 0 and instances.pred_boxes.tensor.shape[1] == 4
    assert instances.has("pred_masks") == cfg.MODEL.MASK_ON
    if cfg.MODEL.MASK_ON:
        assert instances.pred_masks.shape[-2:] == (200, 240)
