"""Run under ``torchrun --nproc_per_node 2`` (gloo, CPU) by tests/test_distributed.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py <check> <out dir>

Each check compares what the ranks compute together with one process on the concatenated
batch, asserts, and writes ``<out>/<check>-rank<r>.ok`` so the test knows every rank got there.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from deepcut_fast import contrastive_unlearn_loss  # noqa: E402
from deepcut_fast.unlearning.unlearner import UnlearnConfig, deepcut_loss  # noqa: E402


def loss_check(rank, world):
    """Uneven rows per rank (token-like): value equals the loss of the concatenation; the
    gradient is that of the sum of the ranks' (equal) losses, i.e. world x the single one."""
    g = torch.Generator().manual_seed(0)
    sizes = [7, 12]
    z_all = torch.randn(sum(sizes), 16, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (sum(sizes),), generator=g)
    labels[3] = -100
    forget = torch.rand(sum(sizes), generator=g) < 0.3
    instance = torch.cat([torch.arange(n) // 2 for n in sizes])  # local ids: pairs of views, reused per rank
    global_instance = torch.cat([torch.arange(n) // 2 + 100 * r for r, n in enumerate(sizes)])
    options = dict(temperature=0.3, backend="reference")
    z_ref = z_all.clone().requires_grad_()
    want = contrastive_unlearn_loss(z_ref, labels, forget, instance_ids=global_instance, **options)
    want.backward()
    rows = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    z = z_all[rows].clone().requires_grad_()
    got = contrastive_unlearn_loss(z, labels[rows], forget[rows], instance_ids=instance[rows],
                                   process_group=dist.group.WORLD, **options)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z.grad, world * z_ref.grad[rows], rtol=1e-10, atol=1e-12)
    per_row = contrastive_unlearn_loss(z.detach(), labels[rows], forget[rows], instance_ids=instance[rows],
                                       process_group=dist.group.WORLD, reduction="none", **options)
    full = contrastive_unlearn_loss(z_all, labels, forget, instance_ids=global_instance, reduction="none", **options)
    torch.testing.assert_close(per_row, full[rows])


def ddp_step_check(rank, world):
    """A DDP step of CE + gamma * global contrast equals one process on the concatenated batch."""
    from torch.nn.parallel import DistributedDataParallel

    from tiny_models import tiny_bert, tokenizer, toy_corpus

    tok = tokenizer()
    data = toy_corpus(per_class=4)
    texts, labels = data.texts[:8], torch.tensor(data.labels[:8])
    forget = torch.tensor([True, False, False, False] * 2)  # each rank: one forget, three retain rows
    cfg = UnlearnConfig(gamma=0.5, temperature=0.4, views=2, backend="reference")

    def model():
        return tiny_bert(data.label_names, tok.vocab_size, seed=0).eval()  # dropout off: views agree

    single = model()
    inputs = tok(texts, padding=True, return_tensors="pt")
    want, _ = deepcut_loss(single, inputs, labels, forget, cfg)
    want.backward()
    local = DistributedDataParallel(model())
    rows = slice(4 * rank, 4 * rank + 4)
    got, _ = deepcut_loss(local, tok(texts[rows], padding=True, return_tensors="pt"), labels[rows], forget[rows], cfg,
                          process_group=dist.group.WORLD)
    got.backward()
    total = got.detach().clone()
    dist.all_reduce(total)
    torch.testing.assert_close(total / world, want.detach(), rtol=1e-5, atol=1e-6)  # CE averages, contrast is global
    for (name, p), q in zip(local.module.named_parameters(), single.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


if __name__ == "__main__":
    dist.init_process_group("gloo")
    check, out = sys.argv[1], Path(sys.argv[2])
    {"loss": loss_check, "ddp_step": ddp_step_check}[check](dist.get_rank(), dist.get_world_size())
    (out / f"{check}-rank{dist.get_rank()}.ok").write_text("ok\n")
    dist.destroy_process_group()
