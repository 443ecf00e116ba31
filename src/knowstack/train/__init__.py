"""One training run: full fine-tuning or LoRA, answer-only loss, packed batches, accelerate-ready."""

from knowstack.train.loop import SUMMARY_FILE, merge_adapter, train
from knowstack.train.settings import TrainSettings

__all__ = ["SUMMARY_FILE", "TrainSettings", "merge_adapter", "train"]
