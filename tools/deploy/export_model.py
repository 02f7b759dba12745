#!/usr/bin/env python
"""Export a DCNv2 Detectron2 model to ONNX, TorchScript, torch.export (.pt2) or AOTInductor.

Follows Detectron2's ``tools/deploy/export_model.py``:

    python tools/deploy/export_model.py --config-file configs/quick_schedules/mask_rcnn_R50_FPN_mdconv_shapes.yaml \
        --format onnx --output out/ MODEL.WEIGHTS output/quick_schedules/mask_rcnn_R50_FPN_mdconv_shapes/model_final.pth

What is written to ``--output``:

| format | whole model (Detectron2 ``TracingAdapter``) | backbone + FPN |
|---|---|---|
| ``onnx`` | ``model.onnx`` (TorchScript exporter, opset 19) | ``backbone.onnx`` (dynamo exporter) |
| ``torchscript`` | ``model.ts`` (``torch.jit.trace``) | ``backbone.ts`` |
| ``pt2`` | - | ``backbone.pt2`` (``torch.export``) |
| ``aoti`` | - | ``backbone_aoti.pt2`` (AOTInductor package) |

The whole model takes one (3, H, W) image as the test-time data loader gives it (resized, in
``INPUT.FORMAT``, H and W dynamic) and returns the detections before the final rescaling to the
original image size (``model.inference(..., do_postprocess=False)``): boxes, classes, masks
(Mask R-CNN, 28 x 28 per detection), scores and the image size, flattened as ``TracingAdapter``
does. The backbone takes the normalised, padded batch (N, 3, H, W), H and W multiples of the
backbone's size divisibility, and returns p2..p6 (N, H, W dynamic). mdpool models cannot be exported
whole to ONNX (no ONNX operator, see docs/deploy.md): the tool writes their backbone and stops with
that error, or use ``--backbone-only``.

After writing, the tool runs each exported file on the sample input (``--sample-image``, else the
first test image) and prints its largest difference from PyTorch. ``--run-eval`` evaluates the
exported whole model (ONNX Runtime or TorchScript) on ``DATASETS.TEST`` with train_net.py's
evaluator (``projects_dcnv2.engine.build_evaluator``). Files with our operators (every format but
ONNX) need ``import projects_dcnv2`` (which loads the extension) before they are loaded.
"""

import argparse
import os
import sys
from collections import OrderedDict

import torch

from detectron2.data import build_detection_test_loader, detection_utils
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.export import TracingAdapter
from detectron2.modeling import GeneralizedRCNN
from detectron2.utils.logger import setup_logger

# (importing the package registers its components)
from projects_dcnv2.engine import (
    build_evaluator,
    build_inference_model,
    inference_config,
    inference_input,
)
from projects_dcnv2.export import TupleOutputs, UnsupportedOperatorError, export_onnx

FORMATS = ("onnx", "torchscript", "pt2", "aoti")
_WHOLE_MODEL_FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 19


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--format", choices=FORMATS, default="onnx")
    parser.add_argument(
        "--export-method",
        choices=["tracing"],
        default="tracing",
        help="how the whole model is captured (Detectron2's TracingAdapter)",
    )
    parser.add_argument(
        "--sample-image", default=None, help="image file; default: the first test image"
    )
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument(
        "--backbone-only", action="store_true", help="export only the backbone + FPN"
    )
    parser.add_argument(
        "--run-eval",
        action="store_true",
        help="evaluate the exported whole model on DATASETS.TEST (onnx, torchscript)",
    )
    parser.add_argument("opts", default=[], nargs=argparse.REMAINDER, help="config KEY VALUE pairs")
    return parser


def get_sample_inputs(cfg, sample_image=None):
    """``[{"image": (3, H, W) float tensor, "height": h, "width": w}]`` as the test loader gives it."""
    if sample_image is None:
        return next(iter(build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])))
    return [inference_input(cfg, detection_utils.read_image(sample_image, format=cfg.INPUT.FORMAT))]


def backbone_input(model, inputs) -> torch.Tensor:
    """The normalised, padded (N, 3, H, W) batch the model's backbone sees for ``inputs``."""
    with torch.no_grad():
        return model.preprocess_image(inputs).tensor


def _detections_before_postprocess(model, inputs):
    return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]


def tracing_adapter(model, inputs) -> TracingAdapter:
    """The whole model as a function of one (3, H, W) image returning a flat tuple of tensors."""
    if not isinstance(model, GeneralizedRCNN):
        raise ValueError(
            f"MODEL.META_ARCHITECTURE: expected a GeneralizedRCNN, got {type(model).__name__}"
        )
    inputs = [{"image": inputs[0]["image"]}]  # height/width only matter to the postprocessing
    return TracingAdapter(model, inputs, _detections_before_postprocess).eval()


def export_whole_model(model, inputs, fmt, output):
    """Writes model.onnx / model.ts; returns (path, adapter)."""
    adapter = tracing_adapter(model, inputs)
    image = adapter.flattened_inputs[0]
    if fmt == "onnx":
        path = os.path.join(output, "model.onnx")
        with torch.no_grad():
            torch.onnx.export(
                adapter,
                (image,),
                path,
                dynamo=False,
                opset_version=ONNX_OPSET,
                input_names=["image"],
                dynamic_axes={"image": {1: "height", 2: "width"}},
            )
    elif fmt == "torchscript":
        path = os.path.join(output, "model.ts")
        with torch.no_grad():
            torch.jit.trace(adapter, (image,), check_trace=False).save(path)
    else:
        raise ValueError(
            f"--format: the whole model exports to {_WHOLE_MODEL_FORMATS}, got {fmt!r}"
        )
    adapter.eval()  # the exporters restore the adapter's mode; keep the model in eval
    return path, adapter


def _backbone_dims(model, x):
    """Dynamic batch, and height / width in multiples of the size divisibility, above the coarsest
    stride (torch.export specialises the p6 map of size 1)."""
    div = max(model.backbone.size_divisibility, 1)
    coarsest = max(s.stride for s in model.backbone.output_shape().values())
    dims = {0: torch.export.Dim("batch", max=64)}
    if x.shape[2] % div == 0 and x.shape[3] % div == 0:
        blocks = dict(min=coarsest // div + 1, max=4096 // div)
        dims[2] = div * torch.export.Dim("height_blocks", **blocks)
        dims[3] = div * torch.export.Dim("width_blocks", **blocks)
    return {"x": dims}


def export_backbone(model, x, fmt, output):
    """Writes backbone.{onnx,ts,pt2} or backbone_aoti.pt2; returns the path."""
    module = TupleOutputs(model.backbone).eval()
    names = list(model.backbone.output_shape())
    if fmt == "torchscript":
        path = os.path.join(output, "backbone.ts")
        with torch.no_grad():
            torch.jit.trace(module, (x,)).save(path)
        return path
    # torch.export specialises dimensions of size 1: trace a batch of two, and a map whose coarsest
    # output (p6) is at least 2 x 2, so batch, height and width stay dynamic.
    x = x.expand(2, -1, -1, -1).contiguous() if x.shape[0] == 1 else x
    min_side = (
        max(s.stride for s in model.backbone.output_shape().values())
        + model.backbone.size_divisibility
    )
    x = torch.nn.functional.pad(
        x, (0, max(0, min_side - x.shape[3]), 0, max(0, min_side - x.shape[2]))
    )
    program = torch.export.export(
        module, (x,), dynamic_shapes=_backbone_dims(model, x), strict=False
    )
    if fmt == "onnx":
        path = os.path.join(output, "backbone.onnx")
        export_onnx(
            program, (x,), path, opset_version=ONNX_OPSET, input_names=["x"], output_names=names
        )
    elif fmt == "pt2":
        path = os.path.join(output, "backbone.pt2")
        torch.export.save(program, path)
    elif fmt == "aoti":
        path = torch._inductor.aoti_compile_and_package(
            program, package_path=os.path.join(output, "backbone_aoti.pt2")
        )
    else:
        raise ValueError(f"--format: expected one of {FORMATS}, got {fmt!r}")
    return path


def load_exported(path):
    """A callable (tensors -> tuple of tensors) running an exported file."""
    if path.endswith(".onnx"):
        return OnnxRunner(path)
    if path.endswith(".ts"):
        return torch.jit.load(path)
    if path.endswith("_aoti.pt2"):
        return torch._inductor.aoti_load_package(path)
    return torch.export.load(path).module()


class OnnxRunner:
    """Runs an ONNX file in ONNX Runtime (CPU): torch tensors in, a tuple of torch tensors out."""

    def __init__(self, path, threads=0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # Idle ORT threads spin after each run and slow down whatever runs next.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *tensors):
        feed = {name: t.detach().cpu().numpy() for name, t in zip(self.input_names, tensors)}
        return tuple(torch.from_numpy(a) for a in self.session.run(None, feed))


def max_differences(reference, outputs) -> list:
    """Largest absolute difference per output (outputs of other shapes: inf)."""
    diffs = []
    for ref, out in zip(reference, outputs):
        same = tuple(ref.shape) == tuple(out.shape)
        diffs.append(
            (out.to(ref.device).double() - ref.double()).abs().max().item()
            if same and ref.numel()
            else (0.0 if same else float("inf"))
        )
    return diffs


class ExportedRCNN:
    """An exported whole model behind the interface of ``GeneralizedRCNN.forward`` at test time:
    list of dicts in, ``[{"instances": ...}]`` at each input's original size out."""

    def __init__(self, runner, adapter):
        self.runner, self.adapter = runner, adapter

    def __call__(self, inputs):
        results = []
        for item in inputs:
            image = item["image"]
            outputs = self.adapter.outputs_schema(self.runner(image))
            results.extend(
                GeneralizedRCNN._postprocess(
                    [outputs[0]["instances"]], [item], [tuple(image.shape[1:])]
                )
            )
        return results


def _report(name, path, diffs, reference):
    scales = [r.abs().max().item() if r.numel() else 0.0 for r in reference]
    print(
        f"{name}: {path}; largest |exported - PyTorch| (largest |PyTorch|) per output: "
        + ", ".join(f"{d:.3g} ({m:.3g})" for d, m in zip(diffs, scales))
    )


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger()  # Detectron2's logging (evaluation results, print_csv_format)
    cfg = inference_config(args.config_file, args.opts)
    os.makedirs(args.output, exist_ok=True)
    model = build_inference_model(cfg)
    inputs = get_sample_inputs(cfg, args.sample_image)
    result = OrderedDict()

    x = backbone_input(model, inputs)
    path = export_backbone(model, x, args.format, args.output)
    with torch.no_grad():
        reference = tuple(model.backbone(x).values())
        diffs = max_differences(reference, load_exported(path)(x))
    _report("backbone + FPN", path, diffs, reference)
    result["backbone"] = (path, diffs)
    if args.backbone_only or args.format not in _WHOLE_MODEL_FORMATS:
        if args.run_eval:
            raise SystemExit(
                f"--run-eval: needs the whole model, exported with --format {' or '.join(_WHOLE_MODEL_FORMATS)}"
            )
        return result

    try:
        path, adapter = export_whole_model(model, inputs, args.format, args.output)
    except UnsupportedOperatorError as e:
        raise SystemExit(f"whole model not exported: {e}") from e
    runner = load_exported(path)
    with torch.no_grad():
        reference = adapter(adapter.flattened_inputs[0])
        diffs = max_differences(reference, runner(adapter.flattened_inputs[0]))
    _report("whole model", path, diffs, reference)
    result["model"] = (path, diffs)

    if args.run_eval:
        dataset = cfg.DATASETS.TEST[0]
        evaluator = build_evaluator(cfg, dataset, os.path.join(args.output, "inference"))
        metrics = inference_on_dataset(
            ExportedRCNN(runner, adapter), build_detection_test_loader(cfg, dataset), evaluator
        )
        print_csv_format(metrics)
        result["metrics"] = metrics
    return result


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
