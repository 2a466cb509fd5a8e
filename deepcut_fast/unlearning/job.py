"""``deepcut-fast unlearn``: a user's fine-tuned model and data in, the unlearned model out.

The run checkpoints every few steps to ``<out>/checkpoint.pt``; started again with the same
``--out`` after an interruption, it continues from the last checkpoint. The unlearned model
(``<out>/model``, save_pretrained) and ``<out>/report.json`` are written atomically, and the
checkpoint is removed once they exist.
"""
import json
import time
from pathlib import Path

from deepcut_fast.evaluation import classification_metrics, evaluate, predict
from deepcut_fast.unlearning.data import forget_indices, load_table
from deepcut_fast.unlearning.files import atomic_write, save_model_atomically
from deepcut_fast.unlearning.model import load_classifier
from deepcut_fast.unlearning.unlearner import Checkpoint, DeepCUTUnlearner, UnlearnConfig


def model_label_names(model_dir):
    """The classes of a fine-tuned classifier, in id order, from its config."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    return [config.id2label[i] for i in sorted(config.id2label)]


def run_unlearn_job(model_dir, data_path, out, config: UnlearnConfig, forget_spec: dict, test_path=None,
                    columns=None, checkpoint_every=5, progress=True):
    """Unlearn ``forget_spec`` (forget_indices' keywords) from the model in ``model_dir``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    columns = columns or {}
    label_names = model_label_names(model_dir)
    train = load_table(data_path, label_names=label_names, **columns)  # labels outside the model's fail
    forget, retain = train.partition(forget_indices(train, **forget_spec))
    model, tokenizer = load_classifier(model_dir, label_names)
    checkpoint = Checkpoint(out / "checkpoint.pt", every=checkpoint_every)
    resumed_from = (checkpoint.load() or {}).get("step", 0)
    start = time.perf_counter()
    result = DeepCUTUnlearner(model, tokenizer, config).unlearn(forget, retain, progress=progress,
                                                                checkpoint=checkpoint)
    seconds = time.perf_counter() - start
    if test_path is not None:
        test = load_table(test_path, label_names=label_names, **{k: v for k, v in columns.items() if k != "id_column"})
        metrics = evaluate(model, tokenizer, forget, retain, test, label_names, max_length=config.max_length)
    else:
        metrics = {name: classification_metrics(predict(model, tokenizer, data, max_length=config.max_length),
                                                label_names) for name, data in (("forget", forget), ("retain", retain))}
    save_model_atomically(result.model, tokenizer, out / "model")
    report = dict(config=vars(config), sizes=dict(forget=len(forget), retain=len(retain)), seconds=seconds,
                  resumed_from_step=resumed_from, stopped_early=result.stopped_early, metrics=metrics,
                  history=result.history)
    atomic_write(out / "report.json", lambda f: f.write(json.dumps(report, indent=2).encode()))
    checkpoint.path.unlink(missing_ok=True)
    return report
