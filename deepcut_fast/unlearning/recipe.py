"""How a model was fine-tuned (``recipe.json``, which ``deepcut-fast finetune`` saves beside the
model): retraining repeats it on the retain set, and a calibrated run's time budget is a share of
that retraining, in its precision."""
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

from deepcut_fast.unlearning.data import read_json
from deepcut_fast.unlearning.model import PRECISIONS
from deepcut_fast.unlearning.unlearner import steps_for

RECIPE_FILE = "recipe.json"


@dataclass
class Recipe:
    """How the original was fine-tuned, so that retraining can repeat it on the retain set:
    AdamW at ``learning_rate`` for ``epochs`` passes in batches of ``batch_size``, from the
    pretrained model in ``base`` (None: the embedded MiniLM-L6), in ``precision`` (fp32, or
    autocast to bf16 / fp16; fp32 is how transformers' Trainer fine-tunes unless told otherwise).
    A calibrated run's budget is a share of retraining in this precision."""
    base: Optional[str] = None
    epochs: float = 2.0
    learning_rate: float = 5e-5
    batch_size: int = 32
    max_length: int = 64
    seed: int = 0
    precision: str = "fp32"

    def __post_init__(self):
        for name in ("epochs", "learning_rate"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"recipe {name} must be a finite number > 0, got {getattr(self, name)!r}")
        for name in ("batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"recipe {name} must be >= 1, got {getattr(self, name)!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"recipe precision must be one of {tuple(PRECISIONS)}, got {self.precision!r}")
        if self.base is not None and not (Path(self.base) / "config.json").is_file():
            raise ValueError(f"recipe base {self.base} is not a saved model directory (no config.json)")

    def steps(self, size, epochs=None):
        return steps_for(self.epochs if epochs is None else epochs, size, self.batch_size)

    def cache_key(self):
        """The fields that name a model trained with this recipe in a cache. fp32, the precision
        of every recipe before recipes named one, is left out: models cached then are found again."""
        values = asdict(self)
        if values["precision"] == "fp32":
            del values["precision"]
        return values

    @classmethod
    def load(cls, path):
        """A recipe file (JSON); unknown or missing-typed fields are named."""
        values = read_json(path)
        known = {f.name for f in fields(cls)}
        if not isinstance(values, dict) or set(values) - known:
            raise ValueError(f"{path}: a recipe is a JSON object with the keys {sorted(known)}")
        try:
            return cls(**values)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None


def saved_recipe(model_dir):
    """The recipe that ``finetune`` saved beside the model in ``model_dir``, or None."""
    saved = Path(model_dir) / RECIPE_FILE
    return Recipe.load(saved) if saved.is_file() else None
