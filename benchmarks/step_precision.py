"""What a DeepCUT training step and a retraining step cost in fp32 and in bf16 autocast.

    python -m benchmarks.step_precision [--corpora bbc_news rotten_tomatoes debates_2016] \
        [--repeats 5] [--out benchmarks/results/step-precision.json]

A calibrated run's budget is a share of retraining's time, timed by a few retraining steps
(cross-entropy on a retain batch) in ``retrain_precision`` (fp32 unless told); its own steps run in
``precision``. For each corpus this times, on the embedded MiniLM-L6 with a fresh head (the cost
of a step does not depend on the weights) and the demo's batches (16 forget and 32 retain
samples, ``max_length`` 64): a DeepCUT step with each request's settings (one dropout view for a
whole class or mislabelled samples, two for a sample-level request) and a retraining step, each
in fp32 and in bf16, alternating, the fastest of ``--repeats``. It records the precision
``precision="auto"`` picks here and how many DeepCUT steps fit in the time of one fp32
retraining step either way.
"""
import argparse
import datetime
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.check_precision import cpu_name
from deepcut_fast.unlearning.data import CORPORA, corpus_split
from deepcut_fast.unlearning.files import atomic_write_json
from deepcut_fast.unlearning.model import PRECISIONS, autocast_to, encode_labelled, load_base_encoder, resolve_precision
from deepcut_fast.unlearning.unlearner import UnlearnConfig, deepcut_loss

FORGET, RETAIN, MAX_LENGTH = 16, 32, 64
STEPS = {"deepcut_one_view": ("mislabelled", FORGET), "deepcut_two_views": ("sample", FORGET), "retrain": (None, 0)}


def timed_step(model, optimizer, inputs, labels, forget_mask, config, precision):
    """Seconds of one forward, backward and optimiser step under autocast to ``precision``: a
    DeepCUT step with ``config``, or a retraining (cross-entropy) step for None."""
    optimizer.zero_grad(set_to_none=True)
    start = time.perf_counter()
    with autocast_to("cpu", PRECISIONS[precision]):
        if config is None:
            loss = F.cross_entropy(model(**inputs).logits, labels)
        else:
            loss, _ = deepcut_loss(model, inputs, labels, forget_mask, config)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def compare(corpus, repeats):
    train, _ = corpus_split(corpus)
    model, tokenizer = load_base_encoder(train.label_names)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7)  # steps that barely move the weights
    out = dict(corpus=corpus)
    for name, (request, forget) in STEPS.items():
        rows = [i % len(train) for i in range(forget + RETAIN)]
        inputs, labels = encode_labelled(tokenizer, [train.texts[i] for i in rows], [train.labels[i] for i in rows],
                                         MAX_LENGTH, torch.device("cpu"))
        forget_mask = torch.arange(len(rows)) < forget
        config = None if request is None else UnlearnConfig(max_length=MAX_LENGTH).for_request(request)
        seconds = {"fp32": [], "bf16": []}
        for _ in range(repeats + 1):  # the first of each warms up
            for precision, times in seconds.items():
                times.append(timed_step(model, optimizer, inputs, labels, forget_mask, config, precision))
        out[name] = {precision: min(times[1:]) for precision, times in seconds.items()}
        out[name]["speedup"] = out[name]["fp32"] / out[name]["bf16"]
    for name in ("deepcut_one_view", "deepcut_two_views"):
        out[f"{name}_steps_per_fp32_retrain_step"] = {p: out["retrain"]["fp32"] / out[name][p] for p in ("fp32", "bf16")}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", nargs="+", choices=sorted(CORPORA), default=list(CORPORA))
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per setting (the fastest is kept)")
    parser.add_argument("--out", default="benchmarks/results/step-precision.json")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    rows = []
    for corpus in args.corpora:
        rows.append(compare(corpus, args.repeats))
        print(rows[-1], flush=True)
    atomic_write_json(Path(args.out), dict(
        command=" ".join(["python -m benchmarks.step_precision", *argv]), date=datetime.date.today().isoformat(),
        device=f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, capability "
        f"{torch.backends.cpu.get_cpu_capability()}",
        torch=torch.__version__, auto_picks=resolve_precision("auto", torch.device("cpu")),
        batch=dict(forget=FORGET, retain=RETAIN, max_length=MAX_LENGTH), results=rows))


if __name__ == "__main__":
    main()
