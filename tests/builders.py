"""What the model and config tests share: the config helper, one small-model override set, and
the seed configs (read from the headers in configs/, so a new seed config is tested once added).

    cfg = make_cfg("mask_rcnn_R50_FPN_mdconv", *SMALL, "MODEL.MASK_ON", "False")
    cfg, model = make_model("quick_schedules/faster_rcnn_R50_FPN_mdpool_shapes.yaml", *SMALL, *NARROW)

Detectron2 is imported inside the functions, so that importing this module needs only torch.
"""

import re
from itertools import takewhile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
QUICK = CONFIG_DIR / "quick_schedules"


def _header(path):
    """The comment block a config opens with, as one line."""
    lines = takewhile(lambda line: line.startswith("#"), Path(path).read_text().splitlines())
    return " ".join(line.lstrip("# ") for line in lines)


_TOP = sorted(CONFIG_DIR.glob("*.yaml"))
# The seed table (MMDetection's DCNv2 results): each config names its MMDetection model in its header.
SEED_CONFIGS = [p.stem for p in _TOP if re.search(r"MMDetection [\w-]+_coco:", _header(p))]
# Their plain twins: the same recipe without DCN.
PLAIN_TWINS = [p.stem for p in _TOP if _header(p).startswith("Baseline without DCN")]

# Every knob that makes a run small, none that changes the architecture. Strings, so that the same
# list serves merge_from_list and a train_net.py command line. Add variants after it (later wins).
SMALL = [
    "MODEL.DEVICE", "cpu",
    # 64-px images
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
    # few proposals and sampled RoIs
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "50", "MODEL.RPN.POST_NMS_TOPK_TEST", "10",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
    # random or briefly trained weights score below the 0.05 default: keep the top boxes
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "20",
    # a few-iteration train_net.py run: two images a step, no loader processes
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "2", "SOLVER.CHECKPOINT_PERIOD", "2",
    "DATALOADER.NUM_WORKERS", "0",
]  # fmt: skip

# A variant for tests that run many models: narrow ResNet-50 / FPN / heads, every key name and
# block count kept.
NARROW = [
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "8", "MODEL.RESNETS.RES2_OUT_CHANNELS", "32",
    "MODEL.RESNETS.WIDTH_PER_GROUP", "8", "MODEL.FPN.OUT_CHANNELS", "16",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "32", "MODEL.ROI_BOX_HEAD.MDPOOL.DEFORM_FC_DIM", "32",
    "MODEL.ROI_MASK_HEAD.CONV_DIM", "8",
]  # fmt: skip


def config_path(name):
    """``name`` as a path: a stem or file name in configs/ ("mask_rcnn_R50_FPN"), a path relative
    to configs/ ("quick_schedules/x.yaml"), or any existing path."""
    path = Path(name)
    if not path.is_file():
        path = CONFIG_DIR / (name if str(name).endswith(".yaml") else f"{name}.yaml")
    return str(path)


def make_cfg(name, *opts):
    """Detectron2's defaults + the DCNv2 keys + the config file + ``opts`` (KEY VALUE ...), through
    the package's own ``load_dcnv2_config``; returned unfrozen so that a test may edit it."""
    from projects_dcnv2 import load_dcnv2_config

    cfg = load_dcnv2_config(config_path(name), opts)
    cfg.defrost()
    return cfg


def make_model(name, *opts, seed=0):
    """``(cfg, model)``: ``make_cfg(name, *opts)`` built with ``torch.manual_seed(seed)``."""
    from detectron2.modeling import build_model

    cfg = make_cfg(name, *opts)
    torch.manual_seed(seed)
    return cfg, build_model(cfg)


def training_batch(mask_on, size=128):
    """Two ``size`` x ``size`` images with two ground-truth instances each (classes 0 and 3, their
    polygons when ``mask_on``), as a model's training input."""
    from detectron2.structures import Boxes, Instances, PolygonMasks

    torch.manual_seed(1)
    batch = []
    for _ in range(2):
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor([[10.0, 12, 60, 70], [50, 40, 120, 110]]))
        inst.gt_classes = torch.tensor([0, 3])
        if mask_on:
            inst.gt_masks = PolygonMasks(
                [[[10.0, 12, 60, 12, 35, 70]], [[50.0, 40, 120, 40, 120, 110, 50, 110]]]
            )
        image = torch.rand(3, size, size) * 255
        batch.append({"image": image, "instances": inst, "height": size, "width": size})
    return batch
