"""A toy corpus and a small random BERT for fast unlearning tests (real tokenizer, offline), and
helpers that make or watch a CPU's bf16."""
import contextlib
import random

import torch

from deepcut_fast.unlearning.data import TextDataset, write_table
from deepcut_fast.unlearning.model import default_model_path

WORDS = {"business": ["market", "shares", "profit", "bank", "economy", "trade"],
         "sport": ["match", "goal", "team", "league", "coach", "season"],
         "tech": ["chip", "software", "phone", "internet", "computer", "data"]}
COMMON = ["the", "a", "new", "today", "report", "said", "year", "people"]


def toy_corpus(per_class=24, seed=0):
    rng = random.Random(seed)
    ids, texts, labels = [], [], []
    for label, (name, words) in enumerate(WORDS.items()):
        for i in range(per_class):
            tokens = rng.choices(words, k=4) + rng.choices(COMMON, k=4)
            rng.shuffle(tokens)
            ids.append(f"{name}-{i}")
            texts.append(" ".join(tokens))
            labels.append(label)
    return TextDataset(ids, texts, labels, list(WORDS))


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_path()), local_files_only=True)


def tiny_bert(label_names, vocab_size, task="sequence", seed=0):
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=len(label_names),
                        id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)})
    cls = BertForSequenceClassification if task == "sequence" else BertForTokenClassification
    return cls(config)


def fine_tune(model, tok, data, steps=60, lr=2e-3, seed=0):
    """Plain CE training until a toy corpus (texts or tagged word lists) is memorised (the
    'original' model)."""
    from deepcut_fast.unlearning.model import encode_labelled

    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        idx = torch.randperm(len(data))[:32].tolist()
        inputs, labels = encode_labelled(tok, [data.texts[i] for i in idx], [data.labels[i] for i in idx], 64, "cpu")
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model


PEOPLE = ["john smith", "mary jones", "peter brown", "anna white"]
PLACES = ["paris", "london", "berlin", "madrid"]
FILLER = ["met", "in", "today", "visited", "with", "the", "team", "near"]


def toy_ner_corpus(sentences=48, seed=0, people=PEOPLE, places=PLACES):
    """Word lists tagged O / B-PER / I-PER / B-LOC: a person and a place among filler words."""
    rng = random.Random(seed)
    names = ["B-LOC", "B-PER", "I-PER", "O"]
    ids, texts, labels = [], [], []
    for i in range(sentences):
        words, tags = [], []
        for part in rng.sample([rng.choice(people), rng.choice(places)] + rng.choices(FILLER, k=3), 5):
            span = part.split()
            kind = "PER" if part in people else "LOC" if part in places else None
            words += span
            tags += ["O"] * len(span) if kind is None else [f"B-{kind}"] + [f"I-{kind}"] * (len(span) - 1)
        ids.append(f"s{i}")
        texts.append(words)
        labels.append([names.index(t) for t in tags])
    return TextDataset(ids, texts, labels, names)


def save_toy_job(root):
    """A tiny BERT fine-tuned on the toy corpus, saved with its tokenizer in ``root/model``, and
    the corpus as ``root/train.csv`` (id, text, label name): the inputs of a CLI job."""
    tok = tokenizer()
    data = toy_corpus()
    model = fine_tune(tiny_bert(data.label_names, tok.vocab_size), tok, data)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    write_table(data, root / "train.csv")
    return root


def tiny_decoder(kind, label_names, vocab_size, pad_token_id, seed=0):
    """A small random decoder-only sequence classifier ("gpt2" or "llama"), which pools the last
    non-padding token (found through ``pad_token_id``)."""
    from transformers import (GPT2Config, GPT2ForSequenceClassification, LlamaConfig,
                              LlamaForSequenceClassification)

    torch.manual_seed(seed)
    labels = dict(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                  label2id={n: i for i, n in enumerate(label_names)}, pad_token_id=pad_token_id)
    if kind == "gpt2":
        return GPT2ForSequenceClassification(GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2,
                                                        n_positions=64, **labels))
    return LlamaForSequenceClassification(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=2, num_attention_heads=2,
                                                      num_key_value_heads=2, max_position_embeddings=64, **labels))


@contextlib.contextmanager
def interrupted_at(step):
    """DeepCUT steps raise KeyboardInterrupt (as Ctrl-C would) at the ``step``-th step taken in
    the block."""
    from deepcut_fast.unlearning import unlearner

    real, calls = unlearner.deepcut_loss, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return real(*args)

    unlearner.deepcut_loss = interrupted
    try:
        yield
    finally:
        unlearner.deepcut_loss = real


def bf16_cpu(monkeypatch, avx512_bf16, amx=False):
    """Make this CPU look as if it had AVX512-BF16 and AMX, or not (what native bf16 is read from)."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


def autocast_seen(model):
    """The CPU autocast dtype (None: off) that each forward pass of ``model`` runs under, as a
    list that grows with the passes."""
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(
        torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None))
    return seen
