"""DeepCUTTrainer: a transformers.Trainer user switches class and gets DeepCUT."""
import pytest

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

from transformers import DataCollatorWithPadding, TrainingArguments  # noqa: E402

from deepcut_fast.unlearning.trainer import DeepCUTTrainer  # noqa: E402
from deepcut_fast.unlearning.unlearner import UnlearnConfig, accuracy  # noqa: E402
from tiny_models import fine_tune, tiny_bert, tokenizer, toy_corpus  # noqa: E402


def rows(tok, data, forget_label):
    enc = tok(data.texts, truncation=True)
    return [dict(input_ids=enc["input_ids"][i], attention_mask=enc["attention_mask"][i], labels=data.labels[i],
                 forget=int(data.labels[i] == forget_label)) for i in range(len(data))]


def test_trainer_forgets_a_class(tmp_path):
    tok = tokenizer()
    data = toy_corpus()
    model = fine_tune(tiny_bert(data.label_names, tok.vocab_size), tok, data)
    tech = data.label_names.index("tech")
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=25, per_device_train_batch_size=24,
                             learning_rate=2e-3, report_to=[], use_cpu=True, save_strategy="no", seed=0,
                             logging_strategy="no", disable_tqdm=True)
    trainer = DeepCUTTrainer(model=model, args=args, train_dataset=rows(tok, data, tech),
                             data_collator=DataCollatorWithPadding(tok), unlearn_config=UnlearnConfig(gamma=1.0))
    trainer.train()
    forget, retain = data.partition([i for i, y in enumerate(data.labels) if y == tech])
    assert accuracy(trainer.model, tok, forget) <= 0.1
    assert accuracy(trainer.model, tok, retain) >= 0.95
    metrics = trainer.evaluate(rows(tok, retain, tech))  # evaluation: the model's own CE on retained classes
    assert metrics["eval_loss"] < 0.5
