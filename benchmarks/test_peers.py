"""The peers compute the same numbers as this package on the workloads they are benchmarked on."""
import pytest
import torch
import torch.nn.functional as F

from benchmarks.peers import METHODS, TEMPERATURE, make_workload
from deepcut_fast import contrastive_unlearn_loss_reference as reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def ours(w):
    return reference(w.z.double(), w.labels, w.forget_mask, **dict(
        w.loss_kwargs(), candidates=None if w.candidates is None else w.candidates.double()))


@pytest.mark.skipif(METHODS["supcon_pml"].unavailable(DEVICE, torch.float32) is not None,
                    reason="pytorch-metric-learning missing")
def test_pml_supcon_equals_retain_only_loss():
    w = make_workload("supcon", 96, 24, torch.float64, DEVICE)
    w.labels[:5] = torch.arange(1000, 1005, device=DEVICE)  # anchors without positives drop out in both
    pml = METHODS["supcon_pml"].build()(w)
    torch.testing.assert_close(pml, ours(w), rtol=1e-6, atol=1e-8)


def test_one_positive_workload_is_infonce():
    w = make_workload("one_positive", 64, 24, torch.float64, DEVICE)
    logits = F.normalize(w.z, dim=1) @ F.normalize(w.candidates, dim=1).T / TEMPERATURE
    torch.testing.assert_close(ours(w), F.cross_entropy(logits, torch.arange(64, device=DEVICE)))


@pytest.mark.skipif(METHODS["inf_cl"].unavailable(DEVICE, torch.float32) is not None,
                    reason=str(METHODS["inf_cl"].unavailable(DEVICE, torch.float32)))
def test_inf_cl_equals_one_positive_loss():
    w = make_workload("one_positive", 512, 256, torch.float32, DEVICE)
    torch.testing.assert_close(METHODS["inf_cl"].build()(w).double(), ours(w), rtol=1e-4, atol=1e-4)
