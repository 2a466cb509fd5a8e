"""deepcut_fast: fast DeepCUT contrastive unlearning for fine-tuned language models."""
from deepcut_fast.loss import BACKENDS, ContrastiveUnlearnLoss, available_backends, contrastive_unlearn_loss
from deepcut_fast.reference import contrastive_unlearn_loss_reference

__version__ = "0.1.0"
__all__ = ["BACKENDS", "ContrastiveUnlearnLoss", "available_backends", "contrastive_unlearn_loss",
           "contrastive_unlearn_loss_reference"]
