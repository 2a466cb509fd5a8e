"""What a calibration check's predictions cost and measure in fp32 and in bf16 autocast.

    python -m benchmarks.check_precision [--corpora bbc_news rotten_tomatoes debates_2016] \
        [--cache runs/study-cache] [--out benchmarks/results/check-precision.json]

A check predicts a fixed sample of the forget set (``stop_sample``, 128) and of the held-out set
(``heldout_sample``, 256). For each corpus's original model of the study (random 10% request,
seed 0; trained and cached like the study's when absent) this times those predictions in both
precisions (the faster of two runs each, one thread per core as torch sets it) and compares what
they measure: the predicted classes, the largest difference of a probability, and the
loss-threshold membership AUC (forget sample against held-out sample) that a sample-level
request's target reads. It also records the precision ``check_precision="auto"`` picks here.
"""
import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from deepcut_fast.unlearning.calibration import check_dtype, fixed_sample
from deepcut_fast.unlearning.data import CORPORA
from deepcut_fast.unlearning.demo import DemoOptions, train_models
from deepcut_fast.unlearning.evaluation import loss_mia_auc, predict
from deepcut_fast.unlearning.files import atomic_write_json
from deepcut_fast.unlearning.model import autocast_to


def timed_predictions(model, tokenizer, data, max_length, dtype):
    """(the faster of two runs' seconds, the predictions) with autocast to ``dtype`` (None: fp32)."""
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        with autocast_to("cpu", dtype):
            preds = predict(model, tokenizer, data, max_length=max_length)
        seconds.append(time.perf_counter() - start)
    return min(seconds), preds


def compare(corpus, cache):
    opts = DemoOptions(scenario="random", corpus=corpus, seed=0)
    data, model, tokenizer, _ = train_models(opts, cache)
    cfg = opts.unlearn
    forget = fixed_sample(data["forget"], cfg.stop_sample, cfg.seed)
    heldout = fixed_sample(data["heldout"], cfg.heldout_sample, cfg.seed + 1)
    out = dict(corpus=corpus, rows=dict(forget=len(forget), heldout=len(heldout)))
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        (f_s, f), (h_s, h) = (timed_predictions(model, tokenizer, d, opts.max_length, dtype) for d in (forget, heldout))
        out[name] = dict(seconds=f_s + h_s, forget=f, heldout=h, mia_auc=loss_mia_auc(f, h))
    fp32, bf16 = out.pop("fp32"), out.pop("bf16")
    both = [(fp32[s], bf16[s]) for s in ("forget", "heldout")]
    out.update(seconds_fp32=fp32["seconds"], seconds_bf16=bf16["seconds"], speedup=fp32["seconds"] / bf16["seconds"],
               predictions_differing=int(sum((a.predicted != b.predicted).sum() for a, b in both)),
               max_probability_difference=float(max(np.abs(a.probs - b.probs).max() for a, b in both)),
               mia_auc_fp32=fp32["mia_auc"], mia_auc_bf16=bf16["mia_auc"])
    return out


def cpu_name():
    """The CPU's model name with its family, model and stepping (Linux: a virtual machine may name
    only the vendor; on two days a CPU named "AMD EPYC" ran DeepCUT's bf16 steps 2.2 and 1.65
    times as fast as fp32 ones), else what ``platform`` knows."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
                      if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        ids = ", ".join(f"{key} {fields[key]}" for key in ("cpu family", "model", "stepping") if key in fields)
        return fields["model name"] + (f" ({ids})" if ids else "")
    except (OSError, KeyError):
        return platform.processor() or platform.machine()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", nargs="+", choices=sorted(CORPORA), default=list(CORPORA))
    parser.add_argument("--cache", default="runs/study-cache", help="the study's trained originals")
    parser.add_argument("--out", default="benchmarks/results/check-precision.json")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    rows = [compare(corpus, Path(args.cache)) for corpus in args.corpora]
    for row in rows:
        print(json.dumps(row), flush=True)
    auto = check_dtype("auto", "fp32", torch.device("cpu"))
    atomic_write_json(Path(args.out), dict(
        command=" ".join(["python -m benchmarks.check_precision", *argv]), date=datetime.date.today().isoformat(),
        device=f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, capability "
        f"{torch.backends.cpu.get_cpu_capability()}",
        torch=torch.__version__, auto_picks="fp32" if auto is None else str(auto).removeprefix("torch."), results=rows))


if __name__ == "__main__":
    main()
