#!/usr/bin/env python
"""Train and evaluate DCNv2 models with Detectron2.

    python train_net.py --config-file configs/mask_rcnn_R50_FPN_mdconv.yaml --num-gpus 8
    python train_net.py --config-file <cfg> --eval-only MODEL.WEIGHTS <checkpoint.pth>
    python train_net.py --config-file <cfg> --resume        # continue from OUTPUT_DIR

Data sets are read from $DETECTRON2_DATASETS (default ./datasets), as in Detectron2.
CPU-only machines: configs/quick_schedules/*_shapes.yaml train on an embedded synthetic set.
The trainer, the evaluator and the weight loading (MMDetection / torchvision files too) live in
``projects_dcnv2.engine``.
"""

import torch.distributed as dist

import detectron2.utils.comm as comm
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results

from projects_dcnv2 import load_dcnv2_config
from projects_dcnv2.data import check_datasets_on_disk
from projects_dcnv2.engine import DCNv2Trainer, build_inference_model


def setup(args):
    """Create the config (Detectron2 defaults + DCNv2 keys + file + command line)."""
    cfg = load_dcnv2_config(args.config_file, args.opts)
    default_setup(cfg, args)
    return cfg


def main(args):
    result = train_or_evaluate(args)
    if comm.get_world_size() > 1:  # a worker of launch(): leave the process group cleanly
        comm.synchronize()
        dist.destroy_process_group()
    return result


def train_or_evaluate(args):
    cfg = setup(args)
    needed = cfg.DATASETS.TEST if args.eval_only else cfg.DATASETS.TRAIN + cfg.DATASETS.TEST
    check_datasets_on_disk(needed)  # a clear message naming $DETECTRON2_DATASETS

    if args.eval_only:
        model = build_inference_model(cfg, resume=args.resume)
        res = DCNv2Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = DCNv2Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
