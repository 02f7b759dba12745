#!/usr/bin/env python
"""Smoke test of the installed detectron2 (either install path of tools/install_detectron2.py).

Runs on CPU in about a minute on 2 cores:

1. imports detectron2 and its main subpackages, reports whether ``detectron2._C`` exists
   and checks that ops needing it fail with a clear error when it does not;
2. builds Mask R-CNN R-50-FPN from the model-zoo config (shrunk: small images, few
   proposals, random init) and trains it with ``DefaultTrainer`` for 2 iterations on a
   tiny synthetic dataset (random images with boxes and polygon masks) registered in
   ``DatasetCatalog``; reloads the final checkpoint;
3. evaluates it with ``COCOEvaluator(use_fast_impl=False)`` via ``inference_on_dataset``;
4. runs ``detectron2.engine.launch`` with ``num_gpus_per_machine=2`` on CPU (GLOO unless
   CUDA is available) and checks an ``all_reduce`` across the 2 processes.

Exit status 0 when every step passed. Usage:
    python tools/check_detectron2.py [--skip-train] [--skip-launch] [--keep OUTPUT_DIR]
"""

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
import traceback

TIMINGS = []


def step(name):
    """Decorator-free timer: use as ``with step("name"):``."""

    class _Step:
        def __enter__(self):
            print(f"\n=== {name}", flush=True)
            self.t0 = time.time()
            return self

        def __exit__(self, exc_type, exc, tb):
            dt = time.time() - self.t0
            TIMINGS.append((name, dt, exc_type is None))
            status = "ok" if exc_type is None else f"FAILED ({exc_type.__name__}: {exc})"
            print(f"=== {name}: {status} [{dt:.1f}s]", flush=True)
            return False

    return _Step()


# --------------------------------------------------------------------------------------------
# 1. imports


def check_imports():
    import importlib.util

    import detectron2
    import detectron2.checkpoint  # noqa: F401
    import detectron2.config  # noqa: F401
    import detectron2.data  # noqa: F401
    import detectron2.engine  # noqa: F401
    import detectron2.evaluation  # noqa: F401
    import detectron2.export  # noqa: F401
    import detectron2.layers  # noqa: F401
    import detectron2.model_zoo  # noqa: F401
    import detectron2.modeling  # noqa: F401
    import detectron2.solver  # noqa: F401
    import detectron2.structures  # noqa: F401
    import detectron2.utils.analysis  # noqa: F401
    from detectron2.utils.collect_env import collect_env_info

    has_c = importlib.util.find_spec("detectron2._C") is not None
    print(f"detectron2 {detectron2.__version__} from {os.path.dirname(detectron2.__file__)}")
    print(f"detectron2._C: {'present' if has_c else 'absent (pure-Python install)'}")
    try:
        from importlib.metadata import distribution

        marker = distribution("detectron2").read_text("direct_url.json")
        if marker:
            print(f"direct_url.json: {marker.strip()}")
    except Exception:
        pass
    info = collect_env_info()  # used by engine.default_setup(); must not crash without _C
    assert "detectron2" in info
    if not has_c:
        # Ops implemented in _C must fail loudly, not with an AttributeError on None.
        import torch
        from detectron2.layers.rotated_boxes import pairwise_iou_rotated

        b = torch.tensor([[5.0, 5.0, 4.0, 4.0, 0.0]])
        try:
            pairwise_iou_rotated(b, b)
        except RuntimeError as e:
            assert "without its compiled" in str(e), e
            print(f"ops needing _C raise: {str(e)[:100]}...")
        else:
            raise AssertionError("pairwise_iou_rotated worked without detectron2._C?")
    return has_c


# --------------------------------------------------------------------------------------------
# LazyConfig (omegaconf, hydra overrides, black formatting)


def check_lazy_config(workdir):
    import torch
    from detectron2 import model_zoo
    from detectron2.config import LazyConfig, instantiate

    cfg = model_zoo.get_config("common/models/mask_rcnn_fpn.py")  # a dict with "model"
    cfg = LazyConfig.apply_overrides(cfg, ["model.roi_heads.num_classes=2"])
    assert cfg.model.roi_heads.num_classes == 2
    path = os.path.join(workdir, "lazy.yaml")
    LazyConfig.save(cfg, path)
    assert LazyConfig.load(path).model.roi_heads.num_classes == 2
    assert "num_classes=2" in LazyConfig.to_py(cfg).replace(" ", "")  # formatted by black
    model = instantiate(cfg.model)
    print(f"instantiated {type(model).__name__} with "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    assert isinstance(model, torch.nn.Module)


# --------------------------------------------------------------------------------------------
# 2.+3. train and evaluate a tiny Mask R-CNN

CLASSES = ["square", "triangle"]


def make_dataset(root, n, seed):
    """n random RGB images with 1-2 objects each (box + polygon), in detectron2 dict format."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.RandomState(seed)
    os.makedirs(root, exist_ok=True)
    dicts = []
    for i in range(n):
        h, w = 96 + 16 * (i % 2), 128
        img = Image.fromarray(rng.randint(0, 60, size=(h, w, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(img)
        annos = []
        for k in range(1 + i % 2):
            x0, y0 = rng.randint(4, w // 2), rng.randint(4, h // 2)
            s = rng.randint(20, 36)
            if k == 0:
                poly = [x0, y0, x0 + s, y0, x0 + s, y0 + s, x0, y0 + s]
            else:
                poly = [x0, y0 + s, x0 + s // 2, y0, x0 + s, y0 + s]
            draw.polygon(poly, fill=(200, 60 + 100 * k, 40))
            xs, ys = poly[0::2], poly[1::2]
            annos.append(
                {
                    "bbox": [min(xs), min(ys), max(xs), max(ys)],
                    "bbox_mode": 0,  # BoxMode.XYXY_ABS
                    "segmentation": [[float(v) for v in poly]],
                    "category_id": k,
                    "iscrowd": 0,
                }
            )
        fname = os.path.join(root, f"img{i}.png")
        img.save(fname)
        dicts.append(
            {"file_name": fname, "image_id": i, "height": h, "width": w, "annotations": annos}
        )
    return dicts


def register(name, dicts):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(thing_classes=list(CLASSES))


def tiny_cfg(output_dir):
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(
        model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
    )
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""  # random init: no download
    # Unit-scale inputs: with random weights and FrozenBN (no normalisation), the caffe-style
    # PIXEL_STD of 1.0 makes activations blow up and every detection is dropped as non-finite.
    cfg.MODEL.PIXEL_STD = [57.375, 57.120, 58.395]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(CLASSES)
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # keep detections of the untrained model
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 64
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 200
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 50
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 200
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    cfg.TEST.DETECTIONS_PER_IMAGE = 20
    cfg.INPUT.MIN_SIZE_TRAIN = (96,)
    cfg.INPUT.MAX_SIZE_TRAIN = 160
    cfg.INPUT.MIN_SIZE_TEST = 96
    cfg.INPUT.MAX_SIZE_TEST = 160
    cfg.DATASETS.TRAIN = ("d2smoke_train",)
    cfg.DATASETS.TEST = ("d2smoke_val",)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.BASE_LR = 0.001
    cfg.SOLVER.MAX_ITER = 2
    cfg.SOLVER.STEPS = ()
    cfg.SOLVER.WARMUP_ITERS = 1
    cfg.SOLVER.CHECKPOINT_PERIOD = 1000
    # Random init + unclipped steps can push outputs to inf, leaving no detections to evaluate.
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "norm"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 1.0
    cfg.TEST.EVAL_PERIOD = 0
    cfg.OUTPUT_DIR = output_dir
    cfg.SEED = 0
    cfg.freeze()
    return cfg


def check_train_and_eval(workdir):
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import build_detection_test_loader
    from detectron2.engine import DefaultTrainer
    from detectron2.evaluation import COCOEvaluator, inference_on_dataset
    from detectron2.modeling import build_model
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.logger import setup_logger

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    setup_logger(name="detectron2", abbrev_name="d2")
    register("d2smoke_train", make_dataset(os.path.join(workdir, "train"), 4, seed=0))
    register("d2smoke_val", make_dataset(os.path.join(workdir, "val"), 2, seed=1))
    cfg = tiny_cfg(os.path.join(workdir, "output"))

    class Trainer(DefaultTrainer):
        @classmethod
        def build_evaluator(cls, cfg, dataset_name):
            return COCOEvaluator(
                dataset_name,
                output_dir=os.path.join(cfg.OUTPUT_DIR, "eval_hook"),
                use_fast_impl=False,
                tasks=("bbox", "segm"),
            )

    with step("train: DefaultTrainer, Mask R-CNN R-50-FPN, 2 iterations (+ final eval hook)"):
        seed_all_rng(cfg.SEED)
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        assert trainer.iter == cfg.SOLVER.MAX_ITER, trainer.iter
        losses = {
            k: v.latest() for k, v in trainer.storage.histories().items() if k.startswith("loss")
        }
        print("last losses:", {k: round(float(v), 4) for k, v in sorted(losses.items())})
        assert losses and all(torch.isfinite(torch.tensor(float(v))) for v in losses.values())
        final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
        assert os.path.isfile(final), os.listdir(cfg.OUTPUT_DIR)

    with step("checkpoint: reload model_final.pth"):
        model = build_model(cfg)
        DetectionCheckpointer(model).load(final)
        ref = trainer.model.state_dict()
        for k, v in model.state_dict().items():
            assert torch.equal(v, ref[k]), f"checkpoint mismatch at {k}"

    with step("eval: COCOEvaluator(use_fast_impl=False) via inference_on_dataset"):
        evaluator = COCOEvaluator(
            "d2smoke_val",
            output_dir=os.path.join(cfg.OUTPUT_DIR, "eval"),
            use_fast_impl=False,
            tasks=("bbox", "segm"),
        )
        loader = build_detection_test_loader(cfg, "d2smoke_val")
        results = inference_on_dataset(model, loader, evaluator)
        print("results:", {t: {k: round(v, 3) for k, v in r.items()} for t, r in results.items()})
        assert set(results) == {"bbox", "segm"}, results
        # NaN would mean "no predictions": COCOeval would not have run at all.
        assert not math.isnan(results["bbox"]["AP"]), results
        assert not math.isnan(results["segm"]["AP"]), results


# --------------------------------------------------------------------------------------------
# 4. multi-process launch on CPU


def _launch_worker(result_dir):
    import torch
    import torch.distributed as dist
    from detectron2.utils import comm

    rank = comm.get_rank()
    t = torch.tensor([float(rank + 1)])
    if torch.cuda.is_available():
        t = t.cuda()
    dist.all_reduce(t)
    gathered = comm.all_gather(rank)
    info = (
        f"rank={rank} world={comm.get_world_size()} local_rank={comm.get_local_rank()} "
        f"local_size={comm.get_local_size()} backend={dist.get_backend()} "
        f"all_reduce={t.item()} all_gather={gathered}"
    )
    assert comm.get_world_size() == 2 and t.item() == 3.0 and gathered == [0, 1], info
    comm.synchronize()
    with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as f:
        f.write(info + "\n")
    # Shut the process groups down before the worker exits: leaving them to interpreter
    # teardown occasionally aborted a worker ("terminate called without an active exception").
    dist.destroy_process_group()


def check_launch(workdir):
    import torch
    from detectron2.engine import launch

    result_dir = os.path.join(workdir, "launch")
    os.makedirs(result_dir, exist_ok=True)
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        print("only one GPU visible: NCCL launch with 2 processes is not possible, skipped")
        return
    launch(_launch_worker, num_gpus_per_machine=2, dist_url="auto", args=(result_dir,))
    for r in range(2):
        with open(os.path.join(result_dir, f"rank{r}.txt")) as f:
            print(f.read().strip())


# --------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-train", action="store_true", help="skip training and eval")
    parser.add_argument("--skip-launch", action="store_true", help="skip the 2-process launch")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: tmp)")
    args = parser.parse_args(argv)

    t_start = time.time()
    workdir = args.keep or tempfile.mkdtemp(prefix="d2-check-")
    os.makedirs(workdir, exist_ok=True)
    ok = True
    try:
        with step("import detectron2"):
            check_imports()
        with step("LazyConfig: load, override, save, to_py, instantiate"):
            check_lazy_config(workdir)
        if not args.skip_train:
            check_train_and_eval(workdir)
        if not args.skip_launch:
            with step("launch: 2 processes on one machine, all_reduce"):
                check_launch(workdir)
    except Exception:
        traceback.print_exc()
        ok = False
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    print("\nsummary:")
    for name, dt, passed in TIMINGS:
        print(f"  {'ok  ' if passed else 'FAIL'} {dt:6.1f}s  {name}")
    print(f"  total {time.time() - t_start:.1f}s -> {'PASSED' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
