#!/usr/bin/env python
"""Whole-model benchmark: training step and inference of the DCNv2 configs next to their plain
twins, as the seed table reports them (training memory per GPU, "Mem (GB)"; inference speed,
"Inf time (fps)"), with random weights, on generated images, same machine, same rounds.

    python tools/benchmark_model.py [--rows seed,dcnv2,mimic | CONFIG,...] [--modes train,infer]
        [--device cuda] [--size 800x1333] [--ims-per-batch 2] [--warmup 3] [--iters 10]
        [--nms-candidates 2000] [--torchvision on|off]
        [--impl auto|triton|cuda] [--memory auto|inprocess|isolated|off] [--json out.json] [KEY VALUE ...]

Rows (``ROWS``): the seed's five (Faster mdconv, Faster mdconv dg 4, Faster mdpool, Mask mdconv,
Mask mdconv FP16), mdconv + mdpool (``*_dcnv2``) and mimicking (``*_dcnv2_mimic``, also compared
with ``*_dcnv2``), each with its plain twin; the FP16 row's twin is the plain Mask R-CNN with
AMP on. Trailing KEY VALUE pairs override every config (the CPU test shrinks the models with them).

- **Training** (``train``): Detectron2's own trainer step, ``SimpleTrainer.run_step``, or
  ``AMPTrainer.run_step`` when the config sets SOLVER.AMP.ENABLED (autocast float16 + GradScaler
  from MMDetection's loss scale 512; on CPU, which AMPTrainer refuses, the same step under bfloat16
  autocast without a scaler), with ``build_optimizer`` (SGD, momentum 0.9, at a learning rate of
  1e-5 that keeps random weights from diverging: ``LR``), on a batch of ``--ims-per-batch`` images
  (2, the seed's images per GPU). Timed: the whole step, data to device, forward, backward,
  metrics and optimizer step, in seconds per iteration. A non-finite loss stops the run.
- **Inference** (``infer``): one image (batch 1, as the table's fps), ``model.eval()`` under
  ``torch.no_grad()``, under autocast when the config enables AMP (MMDetection tests its FP16
  model in half precision). The postprocess gets a trained model's load: ``--nms-candidates``
  (2000) (class, box) pairs per image go to NMS, the top-scoring ones, as a pre-NMS top-k would
  (``limit_nms_candidates``; random weights score every class alike, so a fixed threshold would
  send all 80 x 1000 pairs or none); the JSON records the count. The backbone alone (ResNet +
  FPN, all an mdconv config changes) is timed beside it, and its ratio is reported beside the
  whole model's.
- **torchvision peer** (``--torchvision on``): each mdconv row's model also runs with
  torchvision's ``deform_conv2d`` in place of our op (``use_torchvision_deform_conv``, same
  weights), in the same rounds; its ratio to ours is in the row.
- **Ratios** (``bench_utils.ratio_stats``): the median of per-round ratios, with their 25-75%
  range and a check that the ratio of the medians lies in it (``*_agrees``).
- **Inputs**: ``synthetic_batch``: images of ``--size`` (800 x 1333, the seed's scale) with a
  smooth random background and ``--objects`` (16) random polygons of 12 vertices per image, 24 to
  480 px across, painted in random colours, as ground truth: boxes, classes of the 80 COCO ids,
  polygon masks (the COCO format, rasterised by the mask head's loss as in real training). A
  random-weight RPN proposes nothing near them, so in training ``proposals_around_objects`` puts
  ``--proposals-per-object`` (3) proposals around each, as a trained RPN would: with the
  ground-truth boxes appended (ROI_HEADS.PROPOSAL_APPEND_GT) the box and mask heads get 64
  foreground RoIs per image and the mimic branch its 32 crops. The JSON records both counts.
- **Rounds**: the models sharing a twin live in one process (the DCNv2 models get the twin's
  weights wherever they share a parameter), warm up (``--warmup`` steps each; Triton's autotuning
  and cuDNN's handles stay out), then run ``--iters`` rounds, one step of each model per round in
  rotating order, so that load on a shared machine hits all of them. Each row's ratio is the median
  of its per-round ratios to its twin; times are medians; every per-round time is in the JSON,
  which is rewritten after each group of models (a run stopped later keeps the rows it measured).
- **Peak memory**, in GB of 2^30 bytes (MMDetection's "Mem (GB)" is ``max_memory_allocated`` in
  MiB / 1024): ``inprocess`` (the default on CUDA): ``torch.cuda.max_memory_allocated`` during
  the model's step, minus what was allocated when it started, plus the model's own resident
  tensors then (parameters, buffers, gradients, optimizer state): what the model's step peaks at
  in a process of its own. ``isolated`` (the default on CPU): one process per config that builds
  only that model and runs the same steps; the peak is ``max_memory_allocated`` on CUDA and the
  process's max RSS on CPU (interpreter and libraries included, so comparable between rows only).
- ``--impl`` sets DCNV2_CUDA_IMPL for the worker processes (``triton``: the fused kernels,
  ``cuda``: the column kernels, ``auto``: the op's own choice); the JSON records it.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_utils, beside this file
import bench_utils  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AMP = "+amp"  # a twin spec suffix: the config with SOLVER.AMP.ENABLED True
TV = "+tv"  # a peer spec suffix: the DCNv2 config with torchvision's deform_conv2d swapped in

# (key = DCNv2 config, label, group, twin spec, other configs it is also compared with)
ROWS = [
    ("faster_rcnn_R50_FPN_mdconv", "Faster mdconv", "seed", "faster_rcnn_R50_FPN", ()),
    ("faster_rcnn_R50_FPN_mdconv_dg4", "Faster mdconv dg4", "seed", "faster_rcnn_R50_FPN", ()),
    ("faster_rcnn_R50_FPN_mdpool", "Faster mdpool", "seed", "faster_rcnn_R50_FPN", ()),
    ("mask_rcnn_R50_FPN_mdconv", "Mask mdconv", "seed", "mask_rcnn_R50_FPN", ()),
    (
        "mask_rcnn_R50_FPN_mdconv_fp16",
        "Mask mdconv FP16",
        "seed",
        "mask_rcnn_R50_FPN" + AMP,
        (),
    ),  # fmt: skip
    ("faster_rcnn_R50_FPN_dcnv2", "Faster mdconv+mdpool", "dcnv2", "faster_rcnn_R50_FPN", ()),
    ("mask_rcnn_R50_FPN_dcnv2", "Mask mdconv+mdpool", "dcnv2", "mask_rcnn_R50_FPN", ()),
    (
        "faster_rcnn_R50_FPN_dcnv2_mimic",
        "Faster mdconv+mdpool+mimic",
        "mimic",
        "faster_rcnn_R50_FPN",
        ("faster_rcnn_R50_FPN_dcnv2",),
    ),  # fmt: skip
    (
        "mask_rcnn_R50_FPN_dcnv2_mimic",
        "Mask mdconv+mdpool+mimic",
        "mimic",
        "mask_rcnn_R50_FPN",
        ("mask_rcnn_R50_FPN_dcnv2",),
    ),  # fmt: skip
]
GB = bench_utils.GB
# The step's work does not depend on the learning rate. At the 1x recipe's (0.02 x 2 / 16), random
# weights diverge within a dozen steps (on CPU, 320 x 512: the plain Mask R-CNN's classification
# loss rose from ln 81 = 4.4 to 24, its AMP twin's to 1.2e4): keep the weights where they were drawn.
LR = 1e-5
# MMDetection's FP16 config trains with a loss scale of 512; AMPTrainer's GradScaler would start at
# 2^16 and skip the first steps' updates while it backs off.
AMP_INIT_SCALE = 512.0


# ------------------------------------------------------------------------------------- inputs
def synthetic_batch(num_images, height, width, num_objects, num_classes=80, seed=0):
    """Training inputs as Detectron2's DatasetMapper hands them to a model: per image a dict with
    "image" (uint8, 3 x H x W), "height", "width" and "instances" (gt_boxes, gt_classes, gt_masks
    as PolygonMasks). See the module docstring for what the images hold."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from detectron2.structures import Boxes, Instances, PolygonMasks, polygons_to_bitmask

    rng = np.random.default_rng(seed)
    batch = []
    for _ in range(num_images):
        low = torch.from_numpy(rng.uniform(0, 255, (1, 3, height // 32 + 2, width // 32 + 2)))
        image = F.interpolate(low.float(), size=(height, width), mode="bilinear")[0]
        polygons, boxes = [], []
        for _ in range(num_objects):
            side = np.exp(rng.uniform(np.log(24), np.log(480)))
            stretch = np.exp(rng.uniform(-0.7, 0.7))  # aspect ratio 1:2 to 2:1
            w, h = min(side * stretch, width - 2.0), min(side / stretch, height - 2.0)
            cx, cy = rng.uniform(w / 2, width - w / 2), rng.uniform(h / 2, height - h / 2)
            angle = np.sort(rng.uniform(0, 2 * np.pi, 12))
            radius = rng.uniform(0.6, 1.0, 12)
            xs, ys = cx + w / 2 * radius * np.cos(angle), cy + h / 2 * radius * np.sin(angle)
            polygon = np.stack([xs, ys], axis=1).ravel()
            polygons.append([polygon])
            boxes.append([xs.min(), ys.min(), xs.max(), ys.max()])
            inside = torch.from_numpy(polygons_to_bitmask([polygon], height, width))
            image[:, inside] = torch.from_numpy(rng.uniform(0, 255, (3, 1))).float()
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(torch.tensor(np.array(boxes), dtype=torch.float32))
        instances.gt_classes = torch.from_numpy(rng.integers(0, num_classes, num_objects))
        instances.gt_masks = PolygonMasks(polygons)
        batch.append(
            {
                "image": image.round().clamp(0, 255).to(torch.uint8),
                "height": height,
                "width": width,
                "instances": instances,
            }
        )
    return batch


def proposals_around_objects(per_object, seed=0):
    """A forward hook for the proposal generator, active in training only: it replaces the
    lowest-scoring ``per_object`` x (ground-truth boxes) proposals of each image by that many copies
    of each ground-truth box with every edge moved by up to 10% of the box's width or height (IoU
    >= 0.64 with it). A trained RPN proposes dozens of boxes around every object; a random-weight
    one proposes none (0 of 1000 at IoU >= 0.5 here), which would leave the heads, and the mimic
    branch that crops foreground proposals, idle."""
    import torch

    from detectron2.structures import Boxes, Instances

    generator = torch.Generator().manual_seed(seed)

    def hook(module, inputs, output):
        if not module.training:
            return output
        proposals, losses = output
        out = []
        for props, gt in zip(proposals, inputs[2]):
            boxes = gt.gt_boxes.tensor.repeat_interleave(per_object, dim=0)
            wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
            move = torch.rand(boxes.shape, generator=generator).to(boxes.device) * 0.2 - 0.1
            near = Instances(props.image_size)
            near.proposal_boxes = Boxes(boxes + move * wh)
            near.proposal_boxes.clip(props.image_size)
            # the heads do not read objectness in training
            near.objectness_logits = props.objectness_logits.new_zeros(len(boxes))
            out.append(Instances.cat([props[: max(len(props) - len(boxes), 0)], near]))
        return out, losses

    return hook


# ------------------------------------------------------------------------------------- models
def use_torchvision_deform_conv(model):
    """Makes every ``ModulatedDeformConv2d`` of ``model`` call torchvision's ``deform_conv2d``
    with its own weights (offsets [group][tap](dy, dx) and masks [group][tap], the layout both
    ops share), followed by the module's ``norm`` where it has one; float16 and bfloat16 inputs
    run in float32, as torchvision's own autocast runs them. Returns how many it swapped."""
    import types

    import torch
    import torchvision

    from projects_dcnv2.layers import ModulatedDeformConv2d

    def forward(self, x, offset, mask):
        # torchvision's autocast runs the op in float32 and casts back (its CPU kernel has no
        # bfloat16): do that here too, so that the bfloat16 autocast step on CPU runs
        low = x.dtype in (torch.float16, torch.bfloat16)
        with torch.autocast(x.device.type, enabled=False):
            args = [t.float() if low and t is not None else t for t in (x, offset, mask)]
            weight = self.weight.to(args[0].dtype)
            bias = None if self.bias is None else self.bias.to(args[0].dtype)
            y = torchvision.ops.deform_conv2d(
                args[0], args[1], weight, bias, self.stride, self.padding, self.dilation, args[2]
            ).to(x.dtype)
        norm = getattr(self, "norm", None)
        return norm(y) if norm is not None else y

    swapped = 0
    for module in model.modules():
        if isinstance(module, ModulatedDeformConv2d):
            module.forward = types.MethodType(forward, module)
            swapped += 1
    return swapped


def limit_nms_candidates(box_predictor, candidates, counts):
    """Wraps ``box_predictor.inference`` so that the ``candidates`` top-scoring (class, box) pairs
    per image pass the score threshold into NMS, as a pre-NMS top-k would (and pairs tied with the
    last of them, which a threshold cannot split): the threshold becomes the largest score below
    the ``candidates``-th largest foreground score (the lowest over the batch's images). Random weights score every class alike (about 1/81), so a fixed threshold sends either
    all 80 x 1000 pairs or none; a trained model's 0.05 keeps a few thousand. Appends the number
    of pairs that passed (summed over the batch) to ``counts``."""
    import torch

    original = box_predictor.inference

    def inference(predictions, proposals):
        scores = [s[:, :-1] for s in box_predictor.predict_probs(predictions, proposals)]
        thresholds = []
        for s in scores:
            if s.numel() > candidates:  # the largest score below the k-th: ties with it pass too
                kth = torch.topk(s.flatten(), candidates).values[-1]
                below = s[s < kth]
                thresholds.append(below.max().item() if below.numel() else -1.0)
        box_predictor.test_score_thresh = min(thresholds, default=-1.0)
        counts.append(sum(int((s > box_predictor.test_score_thresh).sum()) for s in scores))
        return original(predictions, proposals)

    box_predictor.inference = inference


def _cfg(spec, args):
    from projects_dcnv2 import load_dcnv2_config

    spec = spec[: -len(TV)] if spec.endswith(TV) else spec
    config, amp = (spec[: -len(AMP)], True) if spec.endswith(AMP) else (spec, None)
    opts = [
        "MODEL.DEVICE", args.device, "MODEL.WEIGHTS", "",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
        "SOLVER.IMS_PER_BATCH", args.ims_per_batch, "SOLVER.BASE_LR", LR,
    ]  # fmt: skip
    if amp:
        opts += ["SOLVER.AMP.ENABLED", True]
    return load_dcnv2_config(os.path.join(ROOT, "configs", config + ".yaml"), opts + args.opts)


def _resident_bytes(model, optimizer=None):
    """Bytes of the tensors a model keeps between steps: parameters, buffers, gradients and the
    optimizer's state (momentum)."""
    import torch

    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        tensors += [
            t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)
        ]
    return sum(t.numel() * t.element_size() for t in tensors)


def _bfloat16_cpu_trainer(base):
    """``base`` (SimpleTrainer) whose step is AMPTrainer's where AMPTrainer refuses to run (CPU): the
    forward under bfloat16 autocast, no loss scaling (bfloat16 has float32's range)."""
    import torch

    class BFloat16CPUTrainer(base):
        def run_step(self):
            data = next(self._data_loader_iter)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss_dict = self.model(data)
                losses = sum(loss_dict.values())
            self.optimizer.zero_grad()
            losses.backward()
            self._write_metrics(loss_dict, 0.0)
            self.optimizer.step()

    return BFloat16CPUTrainer


class _Model:
    """One config in a worker: the model, its trainer and event storage, and what its training
    steps reported (foreground RoIs, mimic crops, losses)."""

    def __init__(self, spec, args):
        import torch

        from detectron2.modeling import build_model
        from detectron2.utils.events import EventStorage

        self.spec, self.cfg, self.device = spec, _cfg(spec, args), args.device
        self.amp = self.cfg.SOLVER.AMP.ENABLED
        self.amp_dtype = torch.float16 if self.device == "cuda" else torch.bfloat16
        self.model = build_model(self.cfg)
        self.torchvision_convs = use_torchvision_deform_conv(self.model) if spec.endswith(TV) else 0
        self.nms_candidates = []
        if args.nms_candidates:
            limit_nms_candidates(
                self.model.roi_heads.box_predictor, args.nms_candidates, self.nms_candidates
            )
        if args.proposals_per_object:
            self.model.proposal_generator.register_forward_hook(
                proposals_around_objects(args.proposals_per_object)
            )
        self.trainer, self.storage = None, EventStorage(0)
        self.fg_rois, self.mimic_rois = [], []
        mimic = getattr(self.model.roi_heads, "mimic", None)
        if mimic is not None:  # the branch's classifier sees one row per cropped RoI
            mimic.cls_score.register_forward_hook(
                lambda _m, inputs, _o: self.mimic_rois.append(inputs[0].shape[0])
            )

    def start_training(self, batch):
        import itertools

        import torch

        from detectron2.engine import AMPTrainer, SimpleTrainer
        from detectron2.solver import build_optimizer

        self.model.train()
        data, optimizer = itertools.repeat(batch), build_optimizer(self.cfg, self.model)
        if not self.amp:
            self.trainer = SimpleTrainer(self.model, data, optimizer)
        elif self.device == "cuda":
            scaler = torch.amp.GradScaler("cuda", init_scale=AMP_INIT_SCALE)
            self.trainer = AMPTrainer(self.model, data, optimizer, grad_scaler=scaler)
        else:
            self.trainer = _bfloat16_cpu_trainer(SimpleTrainer)(self.model, data, optimizer)

    def train_step(self):
        with self.storage:  # the model's own EventStorage: its losses and RoI counts
            self.trainer.run_step()  # raises FloatingPointError on a non-finite loss
        self.fg_rois.append(self.storage.latest().get("roi_head/num_fg_samples", (None,))[0])

    def losses(self):
        return {k: v for k, (v, _) in self.storage.latest().items() if "loss" in k}

    def infer(self, inputs):
        import torch

        with torch.no_grad(), torch.autocast(self.device, self.amp_dtype, enabled=self.amp):
            self.model(inputs)

    def backbone(self, images):
        import torch

        with torch.no_grad(), torch.autocast(self.device, self.amp_dtype, enabled=self.amp):
            self.model.backbone(images)

    def resident(self):
        return _resident_bytes(self.model, self.trainer.optimizer if self.trainer else None)


def _share_weights(twin, others):
    """The twin's weights wherever another model has a parameter of the same name and shape."""
    state = twin.state_dict()
    for model in others:
        own = model.state_dict()
        model.load_state_dict(
            {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}, strict=False
        )


def _timed(fn, device, memory):
    """(seconds, peak bytes allocated above the start or None) of one call of ``fn``."""
    import torch

    start_bytes = None
    if device == "cuda":
        torch.cuda.synchronize()
        if memory:
            torch.cuda.reset_peak_memory_stats()
            start_bytes = torch.cuda.memory_allocated()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if start_bytes is None:
        return seconds, None
    return seconds, torch.cuda.max_memory_allocated() - start_bytes


def _rounds(models, steps, iters, device, inprocess):
    """``iters`` rounds, one call of ``steps[spec]`` per model in rotating order. Per spec: the
    times, and with ``inprocess`` the largest (own resident bytes + the step's peak above its
    start)."""
    times = {m.spec: [] for m in models}
    peaks = {m.spec: 0 for m in models}
    for r in range(iters):
        for i in range(len(models)):
            m = models[(r + i) % len(models)]
            resident = m.resident() if inprocess else 0
            seconds, extra = _timed(steps[m.spec], device, inprocess)
            times[m.spec].append(seconds)
            if inprocess:
                peaks[m.spec] = max(peaks[m.spec], resident + extra)
    return times, (peaks if inprocess else None)


def _measure(specs, args, inprocess):
    """Build ``specs`` (twin first) in this process, warm up and time the requested modes
    (inference first: training moves the weights). A dict per spec."""
    models = [_Model(s, args) for s in specs]
    _share_weights(models[0].model, [m.model for m in models[1:]])
    by_spec = {m.spec: m.model for m in models}
    for m in models:  # a torchvision peer: exactly our model's weights
        if m.spec.endswith(TV) and m.spec[: -len(TV)] in by_spec:
            m.model.load_state_dict(by_spec[m.spec[: -len(TV)]].state_dict())
    h, w = (int(v) for v in args.size.split("x"))
    batch = synthetic_batch(args.ims_per_batch, h, w, args.objects)
    out = {s: {} for s in specs}
    if "infer" in args.modes:
        inputs = [{k: batch[0][k] for k in ("image", "height", "width")}]
        images = models[0].model.preprocess_image(inputs).tensor
        for m in models:
            m.model.eval()
        for part, steps in (
            ("infer", {m.spec: (lambda m=m: m.infer(inputs)) for m in models}),
            ("backbone", {m.spec: (lambda m=m: m.backbone(images)) for m in models}),
        ):
            for m in models:
                for _ in range(args.warmup):
                    steps[m.spec]()
            memory = inprocess and part == "infer"
            times, peaks = _rounds(models, steps, args.iters, args.device, memory)
            for s in specs:
                out[s][part] = {"times": times[s]}
                if peaks:
                    out[s][part]["peak_bytes"] = peaks[s]
        for m in models:
            if m.nms_candidates:  # pairs that went to NMS per timed inference (warm-up included)
                out[m.spec]["infer"]["nms_candidates"] = m.nms_candidates
            if m.torchvision_convs:
                out[m.spec]["torchvision_convs"] = m.torchvision_convs
    if "train" in args.modes:
        for m in models:
            m.start_training(batch)
            for _ in range(args.warmup):
                m.train_step()
            m.fg_rois.clear()
            m.mimic_rois.clear()
        steps = {m.spec: m.train_step for m in models}
        times, peaks = _rounds(models, steps, args.iters, args.device, inprocess)
        for m in models:
            res = out[m.spec]["train"] = {"times": times[m.spec], "losses": m.losses()}
            res["fg_rois_per_image"] = m.fg_rois
            if peaks:
                res["peak_bytes"] = peaks[m.spec]
            if m.mimic_rois:
                res["mimic_rois_per_image"] = [k / args.ims_per_batch for k in m.mimic_rois]
            if m.amp and args.device == "cuda":
                res["grad_scale"] = m.trainer.grad_scaler.get_scale()
    return out


def _isolated_peak(spec, args):
    """Peak memory of one config alone in this process: after ``--warmup`` + 1 inference steps
    and after as many training steps (CUDA: max_memory_allocated per mode; CPU: max RSS, which
    only grows, so inference is measured first)."""
    import resource

    import torch

    one = argparse.Namespace(**{**vars(args), "iters": 1})
    peak = {}

    def read():
        if args.device == "cuda":
            value = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return value
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    for mode in ("infer", "train"):
        if mode in args.modes:
            _measure([spec], argparse.Namespace(**{**vars(one), "modes": [mode]}), False)
            peak[mode] = read()
    return peak


# ----------------------------------------------------------------------------------- the runs
def _worker(args, *flags):
    """Runs this script with ``flags`` in a subprocess (DCNV2_CUDA_IMPL set for it); its last
    output line, parsed as JSON."""
    argv = [sys.executable, os.path.abspath(__file__), *flags]
    for name in (
        "device",
        "size",
        "ims_per_batch",
        "objects",
        "proposals_per_object",
        "warmup",
        "iters",
        "nms_candidates",
    ):
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    argv += ["--modes", ",".join(args.modes), *[str(o) for o in args.opts]]
    env = dict(os.environ)
    if args.impl:
        env["DCNV2_CUDA_IMPL"] = args.impl
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(flags)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _row(key, label, group, twin, also, models, isolated):
    """A row of the JSON: medians, ratios to the twin (and to ``also``) from the same rounds."""
    row = {"config": key, "label": label, "group": group, "twin": twin}
    peer = key + TV if key + TV in models else None
    for part in ("train", "infer", "backbone"):
        if part not in models[key]:
            continue
        mine, base = models[key][part], models[twin][part]
        entry = row[part] = {
            "median_s": statistics.median(mine["times"]),
            "twin_median_s": statistics.median(base["times"]),
            **bench_utils.ratio_entry("ratio", mine["times"], base["times"]),
        }
        for other in also:
            entry.update(
                bench_utils.ratio_entry(
                    f"ratio_to_{other}", mine["times"], models[other][part]["times"]
                )
            )
        if peer and part in models[peer]:  # torchvision's op in the same model and rounds
            theirs = models[peer][part]["times"]
            entry["torchvision_median_s"] = statistics.median(theirs)
            entry.update(bench_utils.ratio_entry("torchvision_ratio", theirs, mine["times"]))
        if "nms_candidates" in mine:
            entry["nms_candidates"] = statistics.median(mine["nms_candidates"])
            entry["twin_nms_candidates"] = statistics.median(base["nms_candidates"])
        peaks = {}
        if isolated:
            peaks = {s: isolated[s].get(part) for s in (key, twin)}
        elif "peak_bytes" in mine:
            peaks = {key: mine["peak_bytes"], twin: base["peak_bytes"]}
        if peaks.get(key) and peaks.get(twin):
            entry["peak_gb"], entry["twin_peak_gb"] = peaks[key] / GB, peaks[twin] / GB
            entry["memory_ratio"] = peaks[key] / peaks[twin]
        if part == "infer":
            entry["fps"], entry["twin_fps"] = 1 / entry["median_s"], 1 / entry["twin_median_s"]
    return row


def _select(names):
    groups = {"all": {"seed", "dcnv2", "mimic"}}
    wanted = set()
    for name in names.split(","):
        wanted |= groups.get(name, {name})
    rows = [r for r in ROWS if r[0] in wanted or r[2] in wanted]
    unknown = wanted - {r[0] for r in ROWS} - {r[2] for r in ROWS}
    if unknown:
        sys.exit(f"--rows: unknown {sorted(unknown)}; expected groups seed, dcnv2, mimic, all or "
                 f"configs {[r[0] for r in ROWS]}")  # fmt: skip
    return rows


def _print_table(result):
    print(f"# {result['machine']}; {result['note']}")
    print("| row | twin | train s/iter (twin) | ratio | Mem GB (twin) | ratio "
          "| fps (twin) | inf time ratio | backbone ratio | torchvision / ours: inf, backbone |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        t, i, b = r.get("train", {}), r.get("infer", {}), r.get("backbone", {})

        def f(d, key, fmt):
            return format(d[key], fmt) if key in d else "-"

        def ratio(d, key="ratio"):
            return bench_utils.format_ratio(d, key) if key in d else "-"

        print(
            f"| {r['label']} | {r['twin']} | {f(t, 'median_s', '.3f')} ({f(t, 'twin_median_s', '.3f')}) "
            f"| {ratio(t)} | {f(t, 'peak_gb', '.2f')} ({f(t, 'twin_peak_gb', '.2f')}) "
            f"| {f(t, 'memory_ratio', '.3f')}x | {f(i, 'fps', '.1f')} ({f(i, 'twin_fps', '.1f')}) "
            f"| {ratio(i)} | {ratio(b)} "
            f"| {ratio(i, 'torchvision_ratio')}, {ratio(b, 'torchvision_ratio')} |",
            flush=True,
        )


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rows", default="seed", help="groups (seed, dcnv2, mimic, all) or configs"
    )
    parser.add_argument("--modes", default="train,infer", type=lambda s: s.split(","))
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--size", default="800x1333", help="HxW of the generated images")
    parser.add_argument("--ims-per-batch", type=int, default=2, help="training images per step")
    parser.add_argument("--objects", type=int, default=16, help="ground-truth objects per image")
    parser.add_argument(
        "--proposals-per-object", type=int, default=3, help="training proposals put around each"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model and mode")
    parser.add_argument("--iters", type=int, default=10, help="timed rounds")
    parser.add_argument(
        "--nms-candidates",
        type=int,
        default=2000,
        help="inference: (class, box) pairs per image that go to NMS (0: all, score threshold 0)",
    )
    parser.add_argument(
        "--torchvision",
        choices=["on", "off"],
        default="on",
        help="a peer of each mdconv row with torchvision's deform_conv2d in the same rounds",
    )
    parser.add_argument(
        "--impl", choices=["auto", "triton", "cuda"], help="DCNV2_CUDA_IMPL for the workers"
    )
    parser.add_argument(
        "--memory", choices=["auto", "inprocess", "isolated", "off"], default="auto"
    )
    parser.add_argument("--json", help="write every time, peak and ratio here")
    parser.add_argument("opts", nargs="*", help="KEY VALUE config overrides for every model")
    parser.add_argument("--group-worker", help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    parser.add_argument("--inprocess", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    bad = [m for m in args.modes if m not in ("train", "infer")]
    if bad:
        parser.error(f"--modes: expected train and/or infer, got {bad}")
    if not _re_size(args.size):
        parser.error(f"--size: expected HxW such as 800x1333, got {args.size!r}")
    if args.group_worker or args.memory_worker:
        import torch

        # Random weights can drive activations into the denormal range, where x86 float math is
        # many times slower depending on the values, not on the model: flush them to zero.
        torch.set_flush_denormal(True)
        if args.group_worker:
            print(json.dumps(_measure(args.group_worker.split(","), args, args.inprocess)))
        else:
            print(json.dumps(_isolated_peak(args.memory_worker, args)))
        return 0

    memory = args.memory
    if memory == "auto":
        memory = "inprocess" if args.device == "cuda" else "isolated"
    if memory == "inprocess" and args.device != "cuda":
        parser.error("--memory inprocess needs CUDA (torch.cuda.max_memory_allocated)")
    rows = _select(args.rows)
    groups = {}  # twin -> specs, twin first, each once
    for key, _, _, twin, also in rows:
        specs = groups.setdefault(twin, [twin])
        peers = (key + TV,) if args.torchvision == "on" and "mdconv" in key else ()
        specs += [s for s in (*also, key, *peers) if s not in specs]
    result = _header(args, memory)
    models, isolated = {}, {}
    for specs in groups.values():
        flags = ["--group-worker", ",".join(specs)] + (
            ["--inprocess"] if memory == "inprocess" else []
        )
        models.update(_worker(args, *flags))
        if memory == "isolated":
            for s in specs:
                isolated[s] = _worker(args, "--memory-worker", s)
        # after each group, the rows measured so far: a run stopped later keeps them
        result["rows"] = [_row(*r, models, isolated) for r in rows if r[0] in models]
        result["models"] = models
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    _print_table(result)
    return 0


def _cuda():
    import torch

    return torch.cuda.is_available()


def _re_size(size):
    import re

    return re.fullmatch(r"\d+x\d+", size) is not None


def _header(args, memory):
    memory_note = {
        "inprocess": "peak = max_memory_allocated of the step above its start + the model's resident tensors",
        "isolated": "peak = one process per config (CUDA: max_memory_allocated; CPU: max RSS)",
        "off": "peak memory not measured",
    }[memory]
    return {
        **bench_utils.header(args.device),
        "impl": args.impl or os.environ.get("DCNV2_CUDA_IMPL") or "default",
        "size": args.size,
        "ims_per_batch": args.ims_per_batch,
        "objects_per_image": args.objects,
        "warmup": args.warmup,
        "iters": args.iters,
        "opts": [str(o) for o in args.opts],
        "memory": memory,
        "nms_candidates": args.nms_candidates,
        "note": (
            f"{args.size} images, {args.ims_per_batch} per training step, {args.objects} objects each; "
            + (
                f"inference sends the {args.nms_candidates} top-scoring (class, box) pairs per image "
                "to NMS (a pre-NMS top-k); "
                if args.nms_candidates
                else "inference sends every class of every proposal to NMS (score threshold 0); "
            )
            + f"{args.warmup} warm-up steps, {args.iters} rounds; random weights; {memory_note}"
        ),
    }


if __name__ == "__main__":
    sys.exit(main())
