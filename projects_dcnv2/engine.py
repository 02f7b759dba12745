"""``DCNv2Trainer``: Detectron2's ``DefaultTrainer`` with what long DCNv2 runs need.

- checkpoints go through ``DCNv2Checkpointer`` (atomic writes; loads MMDetection / torchvision
  weights), the periodic ones included;
- checkpoints keep the optimizer (and AMP grad scaler) state, also on Detectron2 releases whose
  ``DefaultTrainer`` saves only the iteration and the LR scheduler;
- the training loader raises an error naming the image file of a bad record.

``train_net.py`` subclasses it and adds only the evaluator.
"""

from detectron2.data import DatasetMapper, build_detection_train_loader
from detectron2.engine import DefaultTrainer

from .checkpoint import DCNv2Checkpointer
from .data.checks import CheckedMapper

__all__ = ["DCNv2Trainer"]


class DCNv2Trainer(DefaultTrainer):
    def build_hooks(self):
        # DefaultTrainer.__init__ creates its checkpointer just before the hooks: swap it here so
        # the PeriodicCheckpointer hook saves through DCNv2Checkpointer too.
        self.checkpointer = DCNv2Checkpointer.from_checkpointer(self.checkpointer)
        return super().build_hooks()

    # Without DefaultTrainer.state_dict of the inner trainer (the PyPI 0.6 build), `--resume` would
    # restart the optimizer's momentum: save and restore it as newer Detectron2 does.
    def state_dict(self):
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:  # absent from checkpoints of the releases above
            self._trainer.load_state_dict(state_dict["_trainer"])

    @classmethod
    def build_train_loader(cls, cfg):
        mapper = CheckedMapper(
            DatasetMapper(cfg, True), num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES
        )
        return build_detection_train_loader(cfg, mapper=mapper)
