"""Recovery after pruning: LoRA fine-tuning with peft, merged back into a vanilla transformers checkpoint."""

from simdiff.config.recover import RecoverConfig
from simdiff.recover.api import Evaluation, RecoverResult, recover
from simdiff.recover.lora import attach_lora, merge
from simdiff.recover.train import TrainResult, train_lora

__all__ = ["Evaluation", "RecoverConfig", "RecoverResult", "TrainResult", "attach_lora", "merge", "recover",
           "train_lora"]
