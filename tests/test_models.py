"""The models users fine-tune: LoRA adapters (PEFT), decoder-only classifiers (GPT-2, Llama),
mixed precision and gradient checkpointing; all tiny and built here (no downloads)."""
import json

import pytest
import torch

from deepcut_fast.cli import main
from deepcut_fast.unlearning import baselines
from deepcut_fast.unlearning.data import forget_indices, write_table
from deepcut_fast.unlearning.model import embed, encode, load_classifier, save_trained, set_activation_checkpointing
from deepcut_fast.unlearning.unlearner import DeepCUTUnlearner, UnlearnConfig, accuracy, deepcut_loss
from tiny_models import fine_tune, tiny_bert, tiny_decoder, tokenizer, toy_corpus

try:
    import peft
except ImportError:  # an optional extra: the adapter tests need it, the others do not
    peft = None
needs_peft = pytest.mark.skipif(peft is None, reason="peft is not installed (the 'peft' extra)")


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(scope="module")
def data():
    return toy_corpus()


def save(model, tok, folder):
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# --- decoder-only classifiers -------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_last_embedding_is_the_token_the_classifier_pools(tok, data, kind, side):
    model = tiny_decoder(kind, data.label_names, tok.vocab_size, tok.pad_token_id).eval()
    tok.padding_side = side
    try:
        inputs = encode(tok, ["chip", "market shares profit bank economy trade today"], 32, "cpu")
    finally:
        tok.padding_side = "right"
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    last = embed(model, out, inputs["attention_mask"], "last")
    lengths = inputs["attention_mask"].sum(1)
    width = inputs["attention_mask"].shape[1]
    where = [width - 1] * 2 if side == "left" else (lengths - 1).tolist()  # worked out from the padding
    torch.testing.assert_close(last, out.hidden_states[-1][torch.arange(2), where])
    torch.testing.assert_close(model.score(last), out.logits)  # the same token transformers pools


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_deepcut_forgets_a_class_of_a_decoder_classifier(tok, data, kind):
    model = fine_tune(tiny_decoder(kind, data.label_names, tok.vocab_size, tok.pad_token_id), tok, data, steps=80)
    forget, retain = data.partition(forget_indices(data, forget_class="tech"))
    assert accuracy(model, tok, forget, 32) >= 0.9
    cfg = UnlearnConfig(calibrate=False, steps=20, learning_rate=2e-3, max_length=32, backend="reference")  # embedding auto: last
    DeepCUTUnlearner(model, tok, cfg).unlearn(forget, retain, progress=False)
    assert accuracy(model, tok, forget, 32) <= 0.2 and accuracy(model, tok, retain, 32) >= 0.9


def test_unlearn_command_on_a_decoder_classifier(tok, data, tmp_path):
    model = fine_tune(tiny_decoder("gpt2", data.label_names, tok.vocab_size, tok.pad_token_id), tok, data, steps=80)
    save(model, tok, tmp_path / "gpt2")
    assert main(["unlearn", "--model", str(tmp_path / "gpt2"), "--data", str(write_table(data, tmp_path / "t.csv")),
                 "--forget-class", "tech", "--out", str(tmp_path / "out"), "--steps", "20", "--no-calibrate", "--lr", "2e-3",
                 "--max-length", "32"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["embedding"] == "last" and report["metrics"]["forget"]["accuracy"] <= 0.2
    assert report["seconds_per_step"] > 0 and report["peak_memory_bytes"] > 0 and report["device"] == "cpu"


# --- LoRA adapters ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapter(tok, data, tmp_path_factory):
    """A tiny BERT classifier saved as the base, and a LoRA adapter fine-tuned on top of it."""
    root = tmp_path_factory.mktemp("lora")
    base = tiny_bert(data.label_names, tok.vocab_size)
    save(fine_tune(base, tok, data, steps=20), tok, root / "base")  # a head that has started to learn
    lora = peft.get_peft_model(tiny_bert(data.label_names, tok.vocab_size).from_pretrained(root / "base"),
                               peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    fine_tune(lora, tok, data, steps=60)
    save(lora, tok, root / "adapter")
    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(root / "base")
    return root


def logits(model, tok, texts):
    with torch.no_grad():
        return model.eval()(**encode(tok, texts, 32, "cpu")).logits


@needs_peft
def test_deepcut_on_an_adapter_trains_only_the_adapter(tok, data, adapter):
    model, tokenizer_ = load_classifier(adapter / "adapter", data.label_names)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    forget, retain = data.partition(forget_indices(data, forget_class="tech"))
    DeepCUTUnlearner(model, tokenizer_, UnlearnConfig(calibrate=False, steps=20, learning_rate=5e-3, max_length=32,
                                                      backend="reference")).unlearn(forget, retain, progress=False)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != (name in trainable or "lora_B" in name), name
    assert accuracy(model, tokenizer_, forget, 32) <= 0.3
    save_trained(model, tokenizer_, adapter / "unlearned")  # as an adapter, in PEFT's format
    assert (adapter / "unlearned" / "adapter_config.json").exists()
    reloaded, _ = load_classifier(adapter / "unlearned", data.label_names)
    torch.testing.assert_close(logits(reloaded, tok, data.texts), logits(model, tok, data.texts))


@needs_peft
def test_unlearn_command_saves_an_adapter_that_reloads_and_predicts_the_same(tok, data, adapter, tmp_path):
    csv_path = write_table(data, tmp_path / "train.csv")
    common = ["--data", str(csv_path), "--id-column", "id", "--forget-class", "tech", "--steps", "10",
              "--lr", "5e-3", "--max-length", "32", "--no-calibrate"]
    assert main(["unlearn", "--model", str(adapter / "adapter"), "--out", str(tmp_path / "out")] + common) == 0
    saved = tmp_path / "out" / "model"
    assert (saved / "adapter_config.json").exists() and not (saved / "config.json").exists()
    assert json.loads((tmp_path / "out" / "report.json").read_text())["adapter"] is True
    reloaded, _ = load_classifier(saved, data.label_names)
    original, _ = load_classifier(adapter / "adapter", data.label_names)
    assert not torch.allclose(logits(reloaded, tok, data.texts[:8]), logits(original, tok, data.texts[:8]))

    assert main(["unlearn", "--model", str(adapter / "adapter"), "--out", str(tmp_path / "merged"), "--merge"]
                + common) == 0
    merged_dir = tmp_path / "merged" / "model"
    assert (merged_dir / "config.json").exists() and not (merged_dir / "adapter_config.json").exists()
    merged, _ = load_classifier(merged_dir, data.label_names)
    torch.testing.assert_close(logits(merged, tok, data.texts[:8]), logits(reloaded, tok, data.texts[:8]),
                               rtol=1e-4, atol=1e-4)  # the same run, folded into full weights

    assert main(["evaluate", "--model", str(saved), "--reference", str(merged_dir), "--test", str(csv_path),
                 "--out", str(tmp_path / "eval.json")] + common[:6] + ["--max-length", "32"]) == 0
    gaps = json.loads((tmp_path / "eval.json").read_text())["gap_to_reference"]
    # the same predictions (a near-tie may flip one of 72 documents: 1.4 points); the membership
    # attack's SVC, trained on confidences, is left out: it can flip on 1e-5 differences
    assert all(gap <= 1.5 for key, gap in gaps.items() if key.endswith(("_accuracy", "_f1")))


@needs_peft
def test_baselines_train_only_the_adapter(tok, data, adapter):
    model, tokenizer_ = load_classifier(adapter / "adapter", data.label_names)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    forget, retain = data.partition(forget_indices(data, forget_class="tech"))
    baselines.random_relabel(model, tokenizer_, forget, retain, UnlearnConfig(calibrate=False, steps=3, learning_rate=1e-3,
                                                                                      max_length=32), progress=False)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


@needs_peft
def test_an_adapter_without_peft_installed_says_what_to_install(data, adapter, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # as if the package were missing
    with pytest.raises(ModuleNotFoundError, match=r"install the peft package \(pip install 'deepcut_fast\[peft\]'\)"):
        load_classifier(adapter / "adapter", data.label_names)


# --- precision and gradient checkpointing -------------------------------------------------------

def test_gradient_checkpointing_gives_the_same_gradients(tok, data):
    batch = data.subset(list(range(0, 72, 6)))
    inputs = encode(tok, batch.texts, 32, "cpu")
    labels = torch.tensor(batch.labels)
    forget = torch.arange(len(batch)) % 3 == 0
    cfg = UnlearnConfig(views=2, backend="reference")  # two dropout passes: the recompute must replay their masks

    def gradients(checkpointing):
        model = tiny_bert(data.label_names, tok.vocab_size).train()
        set_activation_checkpointing(model, checkpointing)
        torch.manual_seed(7)
        deepcut_loss(model, inputs, labels, forget, cfg)[0].backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_and_checkpointing_unlearn(tok, data, precision):
    model = fine_tune(tiny_bert(data.label_names, tok.vocab_size), tok, data)
    forget, retain = data.partition(forget_indices(data, forget_class="tech"))
    cfg = UnlearnConfig(calibrate=False, steps=20, learning_rate=2e-3, max_length=32, precision=precision, gradient_checkpointing=True)
    result = DeepCUTUnlearner(model, tok, cfg).unlearn(forget, retain, progress=False)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    assert accuracy(model, tok, forget, 32) <= 0.2 and accuracy(model, tok, retain, 32) >= 0.9
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())  # off again after the run
