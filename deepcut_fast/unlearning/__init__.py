"""DeepCUT unlearning for transformers classifiers: data, models, training loop, evaluation.

This layer sits above the public loss API (``deepcut_fast.loss``) and below the CLI.
"""
