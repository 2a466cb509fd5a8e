"""The unlearning study's aggregation and target checks, on made-up per-seed summaries."""
import pytest

from benchmarks.unlearning_study import aggregate, markdown, targets
from deepcut_fast.unlearning.demo import METHOD_ORDER


def _report(deepcut_seconds, deepcut_recall, retrain_seconds=100.0):
    rows = {m: dict(forget_f1=90.0, test_f1=95.0, mia_loss_auc=0.5, distance_to_retrain=0.1, seconds=50.0,
                    time_ratio=50.0 / retrain_seconds, forgotten_class_recall_train=50.0,
                    forgotten_class_recall_test=50.0, other_classes_test_f1=96.0, knn_forget=80.0, knn_test=90.0,
                    cka_forget=0.8) for m in METHOD_ORDER}
    rows["retrain"].update(seconds=retrain_seconds, time_ratio=1.0, distance_to_retrain=0.0,
                           forgotten_class_recall_train=0.0, knn_forget=40.0, cka_forget=1.0)
    rows["deepcut"].update(seconds=deepcut_seconds, time_ratio=deepcut_seconds / retrain_seconds,
                           forgotten_class_recall_train=deepcut_recall, distance_to_retrain=0.05,
                           other_classes_test_f1=95.0, knn_forget=50.0, cka_forget=0.9)
    return {"summary": rows, "timing": {"retrain_seconds_same_run": retrain_seconds}, "options": {"seed": 0}}


def test_aggregate_is_mean_and_sample_sd():
    stats = aggregate([_report(20.0, 1.0), _report(30.0, 3.0)])
    assert stats["deepcut"]["seconds"] == pytest.approx((25.0, 7.0710678))
    assert stats["retrain"]["seconds"] == (100.0, 0.0)


def test_class_targets():
    checks = targets("class", [_report(20.0, 1.0), _report(30.0, 2.0)])
    # (DeepCUT's value, limit, met, the second retrained model's value)
    assert checks["forgotten-class recall, training docs (%)"] == (1.5, 2.0, True, 50.0)
    assert checks["time / retrain time"] == pytest.approx((0.25, 0.25, True, None))
    assert checks["other classes' test F1 gap to retrain (points)"] == (1.0, 0.5, False, 0.0)
    assert checks["distance to retrain (closest baseline)"] == (0.05, 0.1, True, 0.1)
    assert checks["knn_forget gap to retrain (closest baseline)"] == (10.0, 40.0, True, 40.0)
    assert checks["1 - CKA to retrain, forget set (closest baseline)"] == pytest.approx((0.1, 0.2, True, 0.2))
    table = markdown({"bbc_news/class": dict(seeds=[0, 1], code_versions=["1234abc", "5678def-modified"],
                                             aggregate=aggregate([_report(20.0, 1.0)] * 2), targets=checks)})
    assert "| forgotten-class recall, training docs (%) | 1.500 | 2.000 | yes | 50.000 |" in table
    assert "| time / retrain time | 0.250 | 0.250 | yes |  |" in table
    assert "Code: 1234abc, 5678def-modified." in table


def test_random_targets_measure_the_second_retraining_on_each_figure():
    reports = [_report(20.0, 1.0), _report(30.0, 2.0)]
    for report in reports:
        report["summary"]["retrain_seed2"].update(distance_to_retrain=0.02, test_f1=96.5)
        for row in report["summary"].values():
            row.setdefault("minority_recall_test", 80.0)
    checks = targets("random", reports)
    assert checks["distance to retrain (2x retrain-vs-retrain)"] == (0.05, 0.04, False, None)
    assert checks["distance to retrain (the original's)"] == (0.05, 0.1, True, None)
    assert checks["test F1 gap to retrain (points)"] == (0.0, 1.0, True, 1.5)
