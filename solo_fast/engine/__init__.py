"""Training and evaluation loops (single process or ``torchrun``)."""
from .evaluate import STAT_NAMES, coco_eval, evaluate
from .train import WarmupStepSchedule, train

__all__ = ["train", "evaluate", "coco_eval", "STAT_NAMES", "WarmupStepSchedule"]
