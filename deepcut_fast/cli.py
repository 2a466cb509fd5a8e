"""Command line of deepcut_fast.

- ``deepcut-fast demo``: the offline unlearning demo (BBC News + MiniLM-L6): fine-tune the
  original, run DeepCUT and the baselines, compare with retraining; writes report.json,
  report.md and report.png.
- ``deepcut-fast unlearn``: DeepCUT on your own fine-tuned model and data; saves the
  unlearned model (save_pretrained), a report and an audit record; an interrupted run resumes;
  ``--previous RUN`` applies a further request to an earlier run's model.
- ``deepcut-fast audit``: verify the chained record of a run's deletion requests (and that the
  model still matches it) and print it.
- ``deepcut-fast evaluate``: a model's utility and membership figures on the forget, retain
  and test sets, and their gaps to a reference (e.g. retrained) model.
- ``deepcut-fast finetune``: fine-tune a pretrained model on your data, saving the recipe
  that ``compare`` repeats to retrain.
- ``deepcut-fast compare``: the demo's harness on your files: the original, retraining (two
  seeds), DeepCUT and every baseline under one budget; writes report.json, .md and .png.
- ``deepcut-fast check``: the loss on every backend available here against the float64
  reference (loss, gradient error, time).

A failure prints one line that names the file, line or option at fault and exits with 1
(2 for a malformed command line); ``--debug`` shows the traceback instead.
"""
import argparse
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from deepcut_fast import available_backends, contrastive_unlearn_loss
from deepcut_fast.testing import synthetic_batch
from deepcut_fast.unlearning.data import CORPORA
from deepcut_fast.unlearning.demo import SCENARIOS, DemoOptions
from deepcut_fast.unlearning.model import EMBEDDINGS, PRECISIONS
from deepcut_fast.unlearning.calibration import REQUEST_SETTINGS, REQUESTS, RETRAIN_SHARE
from deepcut_fast.unlearning.unlearner import CHECKPOINT_EVERY, PRECISION_CHOICES, ConfigError, UnlearnConfig

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _run(backend, batch, temperature):
    z = batch["z"].detach().clone().requires_grad_()
    if z.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = contrastive_unlearn_loss(**dict(batch, z=z), temperature=temperature, backend=backend)
    loss.backward()
    if z.is_cuda:
        torch.cuda.synchronize()
    return loss.detach(), z.grad, time.perf_counter() - start


def check(args):
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    batch = synthetic_batch(args.rows // args.views, args.dim, views=args.views, classes=args.classes,
                            forget_fraction=args.forget_fraction, class_separation=1.0, view_noise=0.2,
                            seed=args.seed, device=device, dtype=dtype)
    ref_loss, ref_grad, _ = _run("reference", dict(batch, z=batch["z"].double()), args.temperature)
    print(f"rows={batch['z'].shape[0]} dim={args.dim} dtype={args.dtype} device={device} "
          f"temperature={args.temperature}; reference in float64: loss {ref_loss.item():.6f}")
    print(f"{'backend':<10} {'loss':>12} {'max|dgrad|/max|grad|':>22} {'fwd+bwd s':>10}")
    failures = 0
    for backend, reason in available_backends(device, dtype).items():
        if reason is not None:
            print(f"{backend:<10} unavailable: {reason}")
            continue
        loss, grad, seconds = _run(backend, batch, args.temperature)
        err = ((grad.double() - ref_grad).abs().max() / ref_grad.abs().max()).item()
        failures += not torch.isfinite(loss).item()
        print(f"{backend:<10} {loss.item():>12.6f} {err:>22.2e} {seconds:>10.3f}")
    return 1 if failures else 0


def demo(args):
    from deepcut_fast.unlearning.compare import markdown_table
    from deepcut_fast.unlearning.demo import default_config, run_demo

    tuned = default_config(args.scenario, args.max_length, args.seed)
    opts = DemoOptions(scenario=args.scenario, corpus=args.corpus, forget_class=args.forget_class, seed=args.seed,
                       train_epochs=args.train_epochs, max_length=args.max_length,
                       unlearn=replace(tuned, **_given(args, DEMO_TUNABLE)), quick=args.quick)
    out = Path(args.out)
    report = run_demo(opts, out, cache=Path(args.cache) if args.cache else None)
    print(markdown_table(report, f"demo, {opts.corpus}, scenario {opts.scenario}"))
    print(f"wrote {out / 'report.json'}, {out / 'report.md'} and {out / 'report.png'}")
    return 0


def finetune(args):
    from deepcut_fast.unlearning.compare import finetune as run_finetune
    from deepcut_fast.unlearning.data import load_table
    from deepcut_fast.unlearning.recipe import Recipe

    recipe = Recipe(**{k: getattr(args, k) for k in ("base", "epochs", "learning_rate", "batch_size", "max_length",
                                                    "seed", "precision") if getattr(args, k) is not None})
    data = load_table(args.data, text_column=args.text_column, label_column=args.label_column,
                      id_column=args.id_column)
    if Path(args.out).exists():
        raise FileExistsError(f"--out {args.out} exists: choose a new folder for the fine-tuned model")
    run_finetune(data, Path(args.out), recipe)
    print(f"fine-tuned {len(data)} samples; wrote {args.out} (with recipe.json, which compare repeats to retrain)")
    return 0


def compare(args):
    from deepcut_fast.unlearning.compare import markdown_table, run_compare
    from deepcut_fast.unlearning.recipe import Recipe

    if args.task != "sequence":
        raise ValueError("compare runs on sequence classification (--task sequence)")
    config = _config(args)
    spec, columns = _data_options(args)
    recipe = Recipe.load(args.recipe) if args.recipe else None
    report = run_compare(args.model, args.data, args.test, args.out, spec, config, recipe=recipe,
                         heldout_path=args.heldout, columns=columns, second_seed=not args.one_retrain,
                         methods=args.methods.split(",") if args.methods else None)
    print(markdown_table(report, f"{args.model} on {args.data}"))
    print(f"wrote {args.out}/report.json, report.md and report.png")
    return 0


def _data_options(args):
    """(forget spec, column names) of the unlearn / evaluate arguments."""
    specs = dict(ids_file=args.forget_ids, column=args.forget_column, forget_class=args.forget_class)
    if args.task == "token":
        columns = dict(tokens_column=args.tokens_column, tags_column=args.tags_column, id_column=args.id_column)
    else:
        columns = dict(text_column=args.text_column, label_column=args.label_column, id_column=args.id_column)
    return {k: v for k, v in specs.items() if v}, columns


def _config(args):
    """The UnlearnConfig of the options given; a bad one is reported by its option."""
    try:
        return UnlearnConfig(**_given(args, CONFIG_OPTIONS))
    except ConfigError as err:  # name the options, not the fields
        message = re.sub(r"\b[a-z_]+\b", lambda m: CONFIG_OPTIONS.get(m.group(), (m.group(),))[0],
                         str(err)).replace("--no-calibrate=False", "--no-calibrate")
        raise ValueError(message) from None


def unlearn(args):
    from deepcut_fast.unlearning.job import retraining_settings, run_unlearn_job

    config = _config(args)
    given = _given(args, CONFIG_OPTIONS)
    config = replace(config, **{k: v for k, v in retraining_settings(args.model, args.previous).items()
                                if k not in given})
    if args.checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    spec, columns = _data_options(args)
    report = run_unlearn_job(args.model, args.data, args.out, config, spec, test_path=args.test, columns=columns,
                             checkpoint_every=args.checkpoint_every, task=args.task, restart=args.restart,
                             device=args.device, merge=args.merge, heldout_path=args.heldout,
                             previous=args.previous, request_id=args.request_id, reference_dir=args.reference)
    if report is None:  # a rank other than 0 of a distributed run
        return 0
    forget_acc = report["metrics"]["forget"]["accuracy"]
    print(f"unlearned {report['sizes']['forget']} samples in {len(report['history'])} steps; "
          f"forget accuracy {100 * forget_acc:.1f}%; wrote {args.out}/model, report.json and audit.jsonl")
    if len(report["requests"]) > 1:
        print("forget accuracy per request: " + ", ".join(
            f"{name} {100 * m['accuracy']:.1f}%" for name, m in report["metrics"]["requests"].items()))
    calibration = report.get("calibration")
    if calibration:
        verdict = "met" if calibration["met"] else "not met" if calibration["measured"] else "not measured"
        print(f"request: {calibration['request']}; target {verdict} ({calibration['aim']}); "
              f"stopped: {calibration['stopped_because']}" + ("" if calibration["rewound_to_step"] is None else
              f"; ended on step {calibration['rewound_to_step']}, the check nearest the target"))
    return 0


def audit(args):
    from deepcut_fast.unlearning.audit import verify

    records = verify(args.run, head=args.head)
    print(f"{'#':>3} {'request':<16} {'started':<20} {'forgotten':>9} {'target':<7} {'forget accuracy per request'}")
    for record in records:
        met = {True: "met", False: "missed", None: "-"}[record.get("target_met")]
        accuracy = ", ".join(f"{name} {100 * value:.1f}%"
                             for name, value in record.get("figures", {}).get("forget_accuracy", {}).items())
        print(f"{record['index']:>3} {str(record.get('request')):<16} {str(record.get('started')):<20} "
              f"{record.get('forgotten_size', '?'):>9} {met:<7} {accuracy}")
    print(f"chain verified: {len(records)} records; the model matches the last one; head {records[-1]['hash']}")
    return 0


def evaluate(args):
    from deepcut_fast.unlearning.job import run_evaluate_job

    spec, columns = _data_options(args)
    report = run_evaluate_job(args.model, args.data, args.test, args.out, spec, reference_dir=args.reference,
                              columns=columns, max_length=args.max_length, task=args.task)
    gaps = report.get("gap_to_reference", {})
    print(f"{'set':<8} {'accuracy':>9} {'macro-F1':>9}")
    for name in ("forget", "retain", "test"):
        if name in report["metrics"]:
            m = report["metrics"][name]
            print(f"{name:<8} {100 * m['accuracy']:>9.1f} {100 * m['macro_f1']:>9.1f}")
    for key in ("mia_loss_auc", "mia_svc_efficacy"):
        if key in report["metrics"]:
            print(f"{key}: {report['metrics'][key]:.3f}")
    if gaps:
        print(f"distance to the reference model: {gaps['distance']:.4f}")
    print(f"wrote {args.out}")
    return 0


# UnlearnConfig fields that `unlearn` exposes: field -> (flag, type or choices, help). Defaults
# are the config's own (shown in --help); an option left out keeps it.
CONFIG_OPTIONS = {
    "request": ("--request", REQUESTS, "what the forget set is; auto: a class when one has no retain sample left, "
                "else samples (mislabelled ones cannot be told from the data: say --request mislabelled)"),
    "calibrate": ("--no-calibrate", False, "turn off the calibrated target, guard and budget: run --steps, or "
                  "until --stop-forget-accuracy"),
    "budget": ("--budget", float, "calibrated runs: time limit, in epochs of retraining on the retain set"),
    "guard_accuracy_drop": ("--guard-accuracy-drop", float,
                            "calibrated runs: most held-out accuracy may fall before a step is undone"),
    "guard_recall_drop": ("--guard-recall-drop", float,
                          "calibrated runs: most any class's held-out recall may fall before a step is undone "
                          "(default: the request's, 0.05; mislabelled 0.15)"),
    "steps": ("--steps", int, "most unlearning steps"),
    "gamma": ("--gamma", float, "weight of the contrastive loss against the retain cross-entropy"),
    "temperature": ("--temperature", float, "temperature of the contrastive loss"),
    "learning_rate": ("--lr", float, "AdamW learning rate"),
    "views": ("--views", int, "dropout passes of each batch (contrast views)"),
    "embedding": ("--embedding", EMBEDDINGS,
                  "embedding contrasted; auto: token for --task token, last for decoder-only models, else cls"),
    "layer": ("--layer", int, "hidden layer of the embedding (-1: last)"),
    "max_length": ("--max-length", int, "tokens per text"),
    "stop_forget_accuracy": ("--stop-forget-accuracy", float,
                             "stop once accuracy on (a sample of) the forget set is at most this"),
    "stop_retain_drop": ("--stop-retain-drop", float,
                         "with --stop-forget-accuracy: also wait until retain accuracy is within this of its start"),
    "forget_batch_size": ("--forget-batch-size", int,
                          "forget samples per step, over all processes (the effective batch is both sizes)"),
    "retain_batch_size": ("--retain-batch-size", int, "retain samples per step, over all processes"),
    "chunk_size": ("--chunk-size", int, "gradient caching: embed each process's batch in chunks of this many samples"),
    "queue_size": ("--queue-size", int, "queue of recent retain embeddings (0: none)"),
    "seed": ("--seed", int, "seed of the batches and dropout"),
    "precision": ("--precision", PRECISION_CHOICES,
                  "forward passes in fp32, or autocast to bf16 / fp16; auto: bf16 where the device computes it "
                  "natively, else fp32"),
    "check_precision": ("--check-precision", PRECISION_CHOICES,
                        "calibrated runs: the checks' predictions; auto: bf16 where the device computes it natively, "
                        "else --precision"),
    "retrain_precision": ("--retrain-precision", PRECISION_CHOICES,
                          "calibrated runs: the precision retraining runs in, for the budget's timed retraining steps "
                          "(default: the precision in the model's recipe.json, which finetune writes; else fp32)"),
    "retrain_epochs": ("--retrain-epochs", float,
                       "calibrated runs: the epochs retraining runs, of which the default budget is a fifth "
                       "(default: the epochs in the model's recipe.json, which finetune writes; else 2.0)"),
    "gradient_checkpointing": ("--gradient-checkpointing", bool,
                               "recompute activations in the backward: less memory, more time"),
}
DEMO_TUNABLE = {k: CONFIG_OPTIONS[k] for k in ("steps", "gamma", "temperature", "learning_rate", "views", "embedding")}


def _dest(flag):
    return flag.lstrip("-").replace("-", "_")


def _add_config_options(parser, options, default_text):
    """One option per UnlearnConfig field in ``options``; it stays None unless given."""
    for name, (flag, kind, text) in options.items():
        typed = dict(choices=kind) if isinstance(kind, tuple) else dict(action="store_true") if kind is bool \
            else dict(action="store_const", const=False) if kind is False else dict(type=kind)
        parser.add_argument(flag, **typed, default=None, help=f"{text} (default: {default_text(name)})")


def _given(args, options):
    """{UnlearnConfig field: value} of the options the user gave."""
    values = {name: getattr(args, _dest(flag), None) for name, (flag, _, _) in options.items()}
    return {name: value for name, value in values.items() if value is not None}


def _config_default(name):
    if name == "calibrate":
        return "calibrated"
    value = getattr(UnlearnConfig, name)
    if value is None and name in REQUEST_SETTINGS["sample"]:
        return "per request: " + ", ".join(f"{kind} {settings[name]}" for kind, settings in REQUEST_SETTINGS.items())
    if value is None and name == "steps":
        return "calibrated runs: as many as the budget allows"
    if value is None and name == "budget":
        return f"{RETRAIN_SHARE:g} x retraining's epochs"
    return "off" if value is None else value


def _demo_default(name):
    return DemoOptions.__dataclass_fields__[name].default


def _add_data_arguments(parser):
    parser.add_argument("--data", required=True, help="training data (.csv or .jsonl; token task: .jsonl)")
    parser.add_argument("--test", default=None, help="held-out data: the membership-inference figures, and the "
                        "calibrated target and guard unless --heldout is given")
    parser.add_argument("--task", choices=["sequence", "token"], default="sequence",
                        help="sequence classification, or token classification (word and tag lists)")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--tokens-column", default="tokens", help="token task: the column of word lists")
    parser.add_argument("--tags-column", default="tags", help="token task: the column of tag lists")
    parser.add_argument("--id-column", default=None)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--forget-ids", help="file with one row id per line")
    which.add_argument("--forget-column", help="boolean column marking the rows to forget")
    which.add_argument("--forget-class", help="forget every row of this class (sequence task)")


class OneLineParser(argparse.ArgumentParser):
    """argparse with its error as one line (no usage block), pointing at --help."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of a failure")
    parser = OneLineParser(prog="deepcut-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    d = sub.add_parser("demo", parents=[common], help="offline DeepCUT demo on BBC News with MiniLM-L6")
    d.add_argument("--scenario", choices=SCENARIOS, default=_demo_default("scenario"))
    d.add_argument("--corpus", choices=sorted(CORPORA), default=_demo_default("corpus"),
                   help="the embedded data set (default: %(default)s)")
    d.add_argument("--forget-class", default=_demo_default("forget_class"),
                   help="class scenario: the class to forget (default: the smallest class)")
    d.add_argument("--seed", type=int, default=_demo_default("seed"))
    d.add_argument("--out", default="runs/demo", help="output folder")
    d.add_argument("--cache", default=None, help="folder of the cached trained models (default <out>/cache)")
    d.add_argument("--train-epochs", type=float, default=_demo_default("train_epochs"),
                   help="epochs of the original and retraining")
    d.add_argument("--max-length", type=int, default=_demo_default("max_length"), help="tokens per document")
    _add_config_options(d, DEMO_TUNABLE, _config_default)
    d.add_argument("--quick", action="store_true", help="300 documents and a few steps: a smoke test")
    d.set_defaults(func=demo)
    u = sub.add_parser("unlearn", parents=[common], help="DeepCUT on your fine-tuned model and data")
    start = u.add_mutually_exclusive_group(required=True)
    start.add_argument("--model", help="directory of a fine-tuned transformers classifier")
    start.add_argument("--previous", help="folder of an earlier unlearn run: apply this request to its model; "
                       "its requests' samples stay forgotten and are measured again")
    u.add_argument("--out", required=True, help="output folder; rerun with the same one to resume")
    u.add_argument("--request-id", default=None,
                   help="name of this request in the report and audit record (default: request-<n>)")
    u.add_argument("--reference", default=None, help="a model retrained without every forgotten sample: its "
                   "distance goes into the report and the audit record (needs --test)")
    _add_data_arguments(u)
    _add_config_options(u, CONFIG_OPTIONS, _config_default)
    u.add_argument("--heldout", default=None, help="held-out data that sets the calibrated target and guard "
                   "(default: the --test file)")
    u.add_argument("--mislabelled", dest="request", action="store_const", const="mislabelled",
                   help="the forget set is mislabelled (noisy or poisoned) samples: same as --request mislabelled")
    u.add_argument("--checkpoint-every", type=int, default=CHECKPOINT_EVERY,
                   help=f"steps between checkpoints (default: {CHECKPOINT_EVERY})")
    u.add_argument("--restart", action="store_true",
                   help="discard the checkpoint or result that --out holds and start over")
    u.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the GPU when there is one)")
    u.add_argument("--merge", action="store_true",
                   help="a PEFT adapter model: save the result merged into a full model instead of as an adapter")
    u.set_defaults(func=unlearn)
    f = sub.add_parser("finetune", parents=[common], help="fine-tune a pretrained model on your data (the original)")
    f.add_argument("--data", required=True, help="training data (.csv or .jsonl)")
    f.add_argument("--out", required=True, help="a new folder for the fine-tuned model and its recipe.json")
    f.add_argument("--base", default=None, help="directory of the pretrained model (default: the embedded MiniLM-L6)")
    f.add_argument("--epochs", type=float, default=None, help="passes over the data (default: 2)")
    f.add_argument("--lr", dest="learning_rate", type=float, default=None, help="AdamW learning rate (default: 5e-5)")
    f.add_argument("--batch-size", type=int, default=None, help="samples per step (default: 32)")
    f.add_argument("--max-length", type=int, default=None, help="tokens per text (default: 64)")
    f.add_argument("--seed", type=int, default=None, help="seed of the batches and dropout (default: 0)")
    f.add_argument("--precision", choices=tuple(PRECISIONS), default=None,
                   help="fp32, or autocast to bf16 / fp16; compare retrains in it (default: fp32)")
    f.add_argument("--text-column", default="text")
    f.add_argument("--label-column", default="label")
    f.add_argument("--id-column", default=None)
    f.set_defaults(func=finetune)
    c = sub.add_parser("compare", parents=[common],
                       help="DeepCUT against retraining and every baseline on your model and files")
    c.add_argument("--model", required=True, help="the fine-tuned model (made by finetune, or with --recipe)")
    c.add_argument("--out", required=True, help="output folder (the retrained models are cached in <out>/cache)")
    c.add_argument("--recipe", default=None, help="JSON file of how the model was fine-tuned (default: "
                   "<model>/recipe.json, which finetune writes); keys base, epochs, learning_rate, batch_size, "
                   "max_length, seed, precision (the budget is a share of retraining in it)")
    c.add_argument("--heldout", default=None, help="held-out data for the calibrated target and guard (default: "
                   "half of --test; the other half is measured)")
    c.add_argument("--one-retrain", action="store_true", help="retrain once (no second seed for the noise floor)")
    c.add_argument("--methods", default=None, help="comma-separated methods to run (default: all)")
    _add_data_arguments(c)
    # compare retrains as the recipe says: the budget's retraining precision and epochs are the recipe's
    _add_config_options(c, {k: v for k, v in CONFIG_OPTIONS.items() if k not in ("retrain_precision", "retrain_epochs")},
                        _config_default)
    c.set_defaults(func=compare)
    a = sub.add_parser("audit", parents=[common], help="verify and print the audit record of an unlearn run")
    a.add_argument("run", help="the output folder of an unlearn run")
    a.add_argument("--head", default=None, help="the hash the last record must have (kept outside the run folder)")
    a.set_defaults(func=audit)
    e = sub.add_parser("evaluate", parents=[common],
                       help="forget / retain / test figures of a model, and gaps to a reference")
    e.add_argument("--model", required=True, help="directory of the model to evaluate")
    e.add_argument("--reference", default=None, help="directory of the reference (e.g. retrained) model")
    e.add_argument("--out", required=True, help="report file (JSON)")
    _add_data_arguments(e)
    e.add_argument("--max-length", type=int, default=UnlearnConfig.max_length,
                   help=f"tokens per text (default: {UnlearnConfig.max_length}, as unlearn)")
    e.set_defaults(func=evaluate)
    p = sub.add_parser("check", parents=[common], help="run every available backend against the reference")
    p.add_argument("--rows", type=int, default=512, help="anchor rows (samples x views)")
    p.add_argument("--dim", type=int, default=384, help="embedding size (MiniLM: 384)")
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--forget-fraction", type=float, default=0.1)
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=check)
    return parser


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) if str(err).strip() else type(err).__name__
    if isinstance(err, KeyError):  # str() of a KeyError is the quoted key alone
        text = f"missing key {text}"
    return text


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"deepcut-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # every failure is one line unless --debug asks for the traceback
        if args.debug:
            raise
        print(f"deepcut-fast {args.command}: error: {one_line(err)} (--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
