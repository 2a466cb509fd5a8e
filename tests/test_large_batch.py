"""Gradient caching and the retain queue, on a tiny random BERT with dropout on."""
import pytest
import torch
import torch.nn.functional as F

from deepcut_fast import contrastive_unlearn_loss
from deepcut_fast.queue import RetainQueue
from deepcut_fast.unlearning.unlearner import UnlearnConfig, cached_deepcut_step, deepcut_loss
from tiny_models import tiny_bert, tokenizer, toy_corpus


@pytest.fixture(scope="module")
def batch():
    tok = tokenizer()
    data = toy_corpus(per_class=6)
    picked = list(range(0, len(data), 2))[:9]
    inputs = tok([data.texts[i] for i in picked], padding=True, return_tensors="pt")
    labels = torch.tensor([data.labels[i] for i in picked])
    forget = torch.arange(9) % 3 == 1
    return tok, data, inputs, labels, forget


def plain_step_with_chunk_dropout(model, inputs, labels, forget, cfg, chunk, seed):
    """Reference: keep every activation; the chunks run in the same order (so the same dropout
    masks) as the cached step, and the whole loss is back-propagated at once."""
    torch.manual_seed(seed)
    zs, metas, ce = [], [], 0
    retain_targets = int((~forget).sum()) * cfg.views
    for start in range(0, len(labels), chunk):
        rows = slice(start, start + chunk)
        outs = [model(**{k: v[rows] for k, v in inputs.items()}, output_hidden_states=True) for _ in range(cfg.views)]
        zs += [o.hidden_states[-1][:, 0] for o in outs]
        ce = ce + sum(F.cross_entropy(o.logits[~forget[rows]], labels[rows][~forget[rows]], reduction="sum")
                      for o in outs) / retain_targets
        ids = torch.arange(len(labels))[rows]
        metas += [(labels[rows], forget[rows], ids)] * cfg.views
    y, f, i = (torch.cat(parts) for parts in zip(*metas))
    contrast = contrastive_unlearn_loss(torch.cat(zs), y, f, instance_ids=i, temperature=cfg.temperature,
                                        backend=cfg.backend)
    loss = ce + cfg.gamma * contrast
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("chunk", [2, 4, 9])
def test_gradient_caching_equals_the_plain_step(batch, chunk):
    tok, data, inputs, labels, forget = batch
    cfg = UnlearnConfig(gamma=0.8, temperature=0.4, views=2, chunk_size=chunk, backend="reference")
    plain = tiny_bert(data.label_names, tok.vocab_size, seed=3).train()  # dropout on
    want = plain_step_with_chunk_dropout(plain, inputs, labels, forget, cfg, chunk, seed=11)
    cached = tiny_bert(data.label_names, tok.vocab_size, seed=3).train()
    torch.manual_seed(11)
    got, parts = cached_deepcut_step(cached, inputs, labels, forget, cfg)
    assert not got.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(cached.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_one_chunk_equals_deepcut_loss(batch):
    tok, data, inputs, labels, forget = batch
    cfg = UnlearnConfig(gamma=0.8, temperature=0.4, views=2, chunk_size=64, backend="reference")
    plain = tiny_bert(data.label_names, tok.vocab_size, seed=3).train()
    torch.manual_seed(2)
    want, _ = deepcut_loss(plain, inputs, labels, forget, cfg)
    want.backward()
    cached = tiny_bert(data.label_names, tok.vocab_size, seed=3).train()
    torch.manual_seed(2)
    got, _ = cached_deepcut_step(cached, inputs, labels, forget, cfg)
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    for p, q in zip(cached.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_queue_keeps_the_newest_retain_rows():
    queue = RetainQueue(5)
    assert queue.candidates() == (None, None)
    z = torch.arange(12.0).view(6, 2)
    queue.push(z, torch.tensor([0, 1, -100, 2, 0, 1]), torch.tensor([False, True, False, False, False, False]))
    assert queue.labels.tolist() == [0, 2, 0, 1] and queue.embeddings[:, 0].tolist() == [0, 6, 8, 10]
    queue.push(z[:2] + 100, torch.tensor([2, 2]), torch.tensor([False, False]))
    assert queue.labels.tolist() == [2, 0, 1, 2, 2] and queue.embeddings[:, 0].tolist() == [6, 8, 10, 100, 102]
    with pytest.raises(ValueError, match="queue size must be an int >= 1"):
        RetainQueue(0)


def test_queue_candidates_give_the_explicit_loss(batch):
    tok, data, inputs, labels, forget = batch
    cfg = UnlearnConfig(gamma=1.0, temperature=0.5, views=2, backend="reference")
    model = tiny_bert(data.label_names, tok.vocab_size, seed=1).eval()
    g = torch.Generator().manual_seed(0)
    bank, bank_labels = torch.randn(7, 32, generator=g), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    queue = RetainQueue(16)
    queue.push(bank, bank_labels, torch.zeros(7, dtype=torch.bool))
    _, parts = deepcut_loss(model, inputs, labels, forget, cfg, queue=queue)

    z = model(**inputs, output_hidden_states=True).hidden_states[-1][:, 0].repeat(2, 1)
    y, f, ids = labels.repeat(2), forget.repeat(2), torch.arange(9).repeat(2)
    want = (contrastive_unlearn_loss(z, y, f, instance_ids=ids, temperature=0.5, backend="reference")
            + contrastive_unlearn_loss(z, y, f, candidates=bank, candidate_labels=bank_labels, temperature=0.5,
                                       backend="reference"))
    torch.testing.assert_close(parts["contrast"], want.detach())
    assert len(queue) == min(16, 7 + 2 * int((~forget).sum()))  # this batch's retain rows joined, capped
