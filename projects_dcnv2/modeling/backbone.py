"""ResNet / ResNet-FPN backbones whose 3x3 convolutions can be DCNv2 (modulated deformable).

Shape shorthand: N = batch, C = channels, H x W = input of a block, Ho x Wo = its output
(Ho = ceil(H / stride)), K = kh * kw kernel taps (9 for 3x3), G = deformable groups.

Each deformable 3x3 conv gets a sibling plain conv ``conv2_offset`` with the same stride, padding
and dilation, producing 3 * G * K channels per output pixel, zero-initialised (so a fresh block
samples the regular grid with mask 0.5). Its output is split like MMCV's
``ModulatedDeformConv2dPack`` (and Detectron2's ``DeformBottleneckBlock``):

* channels [0, 2GK): offsets, laid out [group][tap k = i * kw + j][dy, dx] — the layout of
  ``torchvision.ops.deform_conv2d`` and of our ``ModulatedDeformConv2d``;
* channels [2GK, 3GK): mask logits, [group][tap], passed through a sigmoid.

Parameter names follow Detectron2 (``conv1``, ``conv2`` (+ ``.norm``), ``conv2_offset``,
``conv3``, ``shortcut``), so MMDetection's ``layerL.B.conv2.conv_offset`` maps to
``res{L+1}.B.conv2_offset`` with no permutation.

Only this project's extension is used (CPU and CUDA): Detectron2's own ``DeformConv`` /
``ModulatedDeformConv`` need ``detectron2._C`` and are never touched.
"""

import fvcore.nn.weight_init as weight_init
import torch.nn.functional as F
from torch import nn

from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import FPN, ResNet
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock

from ..layers import ModulatedDeformConv2d

__all__ = [
    "ModulatedDeformBottleneckBlock",
    "ModulatedDeformBasicBlock",
    "build_dcnv2_resnet_backbone",
    "build_dcnv2_resnet_fpn_backbone",
]

_BLOCKS_PER_STAGE = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}


class _NormedModulatedDeformConv2d(ModulatedDeformConv2d):
    """``ModulatedDeformConv2d`` followed by an optional norm, stored as ``.norm`` like
    Detectron2's ``Conv2d`` wrapper (so checkpoints have ``conv2.weight`` and ``conv2.norm.*``)."""

    def __init__(self, *args, norm=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm

    def forward(self, x, offset, mask):
        x = super().forward(x, offset, mask)
        return self.norm(x) if self.norm is not None else x


class _ModulatedDeform3x3:
    """Mixin holding the DCNv2 3x3 conv (``conv2``) and its offset/mask predictor
    (``conv2_offset``); the blocks below call :meth:`_build_deform_conv2` and :meth:`_conv2`."""

    def _build_deform_conv2(
        self, channels_in, channels_out, *, stride, dilation, groups, deform_num_groups, norm
    ):
        kernel_size = 3
        num_fields = deform_num_groups * kernel_size * kernel_size  # G * K
        self.conv2 = _NormedModulatedDeformConv2d(
            channels_in,
            channels_out,
            kernel_size,
            stride=stride,
            padding=dilation,
            dilation=dilation,
            groups=groups,
            deformable_groups=deform_num_groups,
            bias=False,
            norm=get_norm(norm, channels_out),
        )
        weight_init.c2_msra_fill(self.conv2)
        # 2 * G * K offsets (dy, dx per tap and group) followed by G * K mask logits.
        self.conv2_offset = nn.Conv2d(
            channels_in,
            3 * num_fields,
            kernel_size,
            stride=stride,
            padding=dilation,
            dilation=dilation,
        )
        nn.init.zeros_(self.conv2_offset.weight)
        nn.init.zeros_(self.conv2_offset.bias)

    def _conv2(self, x):
        """(N, C, H, W) -> (N, C', Ho, Wo), without the activation."""
        num_fields = self.conv2.deformable_groups * self.conv2.num_taps  # G * K
        offset, mask_logits = self.conv2_offset(x).split(
            [2 * num_fields, num_fields], dim=1
        )  # (N, 2GK, Ho, Wo), (N, GK, Ho, Wo)
        return self.conv2(x, offset, mask_logits.sigmoid())


class ModulatedDeformBottleneckBlock(_ModulatedDeform3x3, BottleneckBlock):
    """Detectron2's ``BottleneckBlock`` (1x1 -> 3x3 -> 1x1 + shortcut) with a DCNv2 3x3.

    Input (N, in_channels, H, W) -> output (N, out_channels, Ho, Wo). With
    ``stride_in_1x1=False`` (PyTorch / MMDetection style) the stride is on the deformable 3x3
    and on ``conv2_offset``.
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        *,
        bottleneck_channels,
        stride=1,
        num_groups=1,
        norm="BN",
        stride_in_1x1=False,
        dilation=1,
        deform_num_groups=1,
    ):
        """
        Args:
            in_channels, out_channels, bottleneck_channels, stride, num_groups, norm,
            stride_in_1x1, dilation: as Detectron2's ``BottleneckBlock``.
            deform_num_groups (int): G, the number of deformable (offset) groups; the
                bottleneck channels are split into G groups that share one offset field.
        """
        super().__init__(
            in_channels,
            out_channels,
            bottleneck_channels=bottleneck_channels,
            stride=stride,
            num_groups=num_groups,
            norm=norm,
            stride_in_1x1=stride_in_1x1,
            dilation=dilation,
        )
        # Replace the plain 3x3 built by BottleneckBlock (same attribute, same key order).
        self._build_deform_conv2(
            bottleneck_channels,
            bottleneck_channels,
            stride=1 if stride_in_1x1 else stride,
            dilation=dilation,
            groups=num_groups,
            deform_num_groups=deform_num_groups,
            norm=norm,
        )

    def forward(self, x):
        out = F.relu_(self.conv1(x))
        out = F.relu_(self._conv2(out))
        out = self.conv3(out)
        out += x if self.shortcut is None else self.shortcut(x)
        return F.relu_(out)


class ModulatedDeformBasicBlock(_ModulatedDeform3x3, BasicBlock):
    """Detectron2's ``BasicBlock`` (ResNet-18/34: strided 3x3 -> 3x3 + shortcut) whose second
    3x3 (``conv2``, stride 1) is DCNv2. MMDetection has no deformable basic block; this one
    exists for small CPU-sized models.

    Input (N, in_channels, H, W) -> output (N, out_channels, Ho, Wo).
    """

    def __init__(self, in_channels, out_channels, *, stride=1, norm="BN", deform_num_groups=1):
        """
        Args:
            in_channels, out_channels, stride, norm: as Detectron2's ``BasicBlock``.
            deform_num_groups (int): G, the number of deformable (offset) groups.
        """
        super().__init__(in_channels, out_channels, stride=stride, norm=norm)
        self._build_deform_conv2(
            out_channels,
            out_channels,
            stride=1,
            dilation=1,
            groups=1,
            deform_num_groups=deform_num_groups,
            norm=norm,
        )

    def forward(self, x):
        out = F.relu_(self.conv1(x))
        out = self._conv2(out)
        out += x if self.shortcut is None else self.shortcut(x)
        return F.relu_(out)


@BACKBONE_REGISTRY.register()
def build_dcnv2_resnet_backbone(cfg, input_shape: ShapeSpec):
    """Detectron2's ResNet where every block of a stage with ``DEFORM_ON_PER_STAGE`` True
    (strided first blocks included, as MMDetection's ``fallback_on_stride=False``) is DCNv2.

    Reads ``MODEL.RESNETS.*`` like Detectron2's ``build_resnet_backbone``; depths 18, 34, 50,
    101. ``RES2_OUT_CHANNELS`` and ``STEM_OUT_CHANNELS`` may be reduced for small models.

    Returns:
        ResNet: outputs ``MODEL.RESNETS.OUT_FEATURES``, e.g. res2..res5 with strides 4..32.
    """
    res = cfg.MODEL.RESNETS
    deform_on = list(res.DEFORM_ON_PER_STAGE)
    if any(deform_on) and not res.DEFORM_MODULATED:
        raise ValueError(
            "MODEL.RESNETS.DEFORM_MODULATED=False asks for DCNv1 (unmodulated), which "
            "projects_dcnv2 does not implement; set MODEL.RESNETS.DEFORM_MODULATED=True."
        )
    if res.DEPTH not in _BLOCKS_PER_STAGE:
        raise ValueError(
            f"MODEL.RESNETS.DEPTH must be one of {sorted(_BLOCKS_PER_STAGE)}, got {res.DEPTH}"
        )
    if res.RES5_DILATION not in (1, 2):
        raise ValueError(f"MODEL.RESNETS.RES5_DILATION must be 1 or 2, got {res.RES5_DILATION}")
    basic = res.DEPTH < 50
    if basic and (res.NUM_GROUPS != 1 or res.RES5_DILATION != 1):
        raise ValueError("ResNet-18/34 need MODEL.RESNETS.NUM_GROUPS=1 and RES5_DILATION=1")

    stem = BasicStem(input_shape.channels, res.STEM_OUT_CHANNELS, norm=res.NORM)
    in_channels, out_channels = res.STEM_OUT_CHANNELS, res.RES2_OUT_CHANNELS
    bottleneck_channels = res.NUM_GROUPS * res.WIDTH_PER_GROUP
    stages = []
    for idx, num_blocks in enumerate(_BLOCKS_PER_STAGE[res.DEPTH]):
        dilation = res.RES5_DILATION if idx == 3 else 1
        first_stride = 1 if idx == 0 or dilation == 2 else 2
        kwargs = dict(
            num_blocks=num_blocks,
            stride_per_block=[first_stride] + [1] * (num_blocks - 1),
            in_channels=in_channels,
            out_channels=out_channels,
            norm=res.NORM,
        )
        if basic:
            kwargs["block_class"] = ModulatedDeformBasicBlock if deform_on[idx] else BasicBlock
        else:
            kwargs["block_class"] = (
                ModulatedDeformBottleneckBlock if deform_on[idx] else BottleneckBlock
            )
            kwargs.update(
                bottleneck_channels=bottleneck_channels,
                stride_in_1x1=res.STRIDE_IN_1X1,
                dilation=dilation,
                num_groups=res.NUM_GROUPS,
            )
        if deform_on[idx]:
            kwargs["deform_num_groups"] = res.DEFORM_NUM_GROUPS
        stages.append(ResNet.make_stage(**kwargs))
        in_channels, out_channels = out_channels, out_channels * 2
        bottleneck_channels *= 2
    return ResNet(
        stem, stages, out_features=res.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT
    )


@BACKBONE_REGISTRY.register()
def build_dcnv2_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """:func:`build_dcnv2_resnet_backbone` + Detectron2's FPN with a max-pooled P6.

    Returns:
        FPN: outputs p2..p6 (strides 4..64), ``MODEL.FPN.OUT_CHANNELS`` channels each.
    """
    return FPN(
        bottom_up=build_dcnv2_resnet_backbone(cfg, input_shape),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
