"""DeepCUT as a drop-in ``transformers.Trainer``: switch the class, add a ``forget`` column.

    trainer = DeepCUTTrainer(model=model, args=args, train_dataset=rows, data_collator=collator,
                             unlearn_config=UnlearnConfig(gamma=1.0, temperature=0.5))
    trainer.train()

Each training row holds the tokenised inputs, ``labels`` and a boolean ``forget``. The training
loss is CE on retain rows + gamma * the contrastive loss over ``views`` dropout passes (the
same ``deepcut_loss`` as DeepCUTUnlearner); evaluation is the model's usual loss.
"""
from transformers import Trainer

from deepcut_fast.unlearning.unlearner import UnlearnConfig, deepcut_loss


class DeepCUTTrainer(Trainer):
    def __init__(self, *args, unlearn_config: UnlearnConfig = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.unlearn_config = unlearn_config or UnlearnConfig()

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "forget" not in self._signature_columns:  # keep the column: the model does not take it
            self._signature_columns.append("forget")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        forget = inputs.pop("forget", None)
        if not model.training or forget is None:  # evaluation: the model's own loss and outputs
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        loss, _ = deepcut_loss(model, inputs, labels, forget.bool(), self.unlearn_config)
        return (loss, None) if return_outputs else loss
