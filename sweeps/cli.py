"""`qlora-sweep`: one console script, one subcommand per job.

    qlora-sweep run SPEC [--storage DIR] [--name NAME] [--address ADDR]
    qlora-sweep validate SPEC
    qlora-sweep estimate SPEC [--json] [--gpu-gib 8 16 ...]
    qlora-sweep report EXPERIMENT_DIR [--budget-gib 8 16 ...] [--out DIR]
    qlora-sweep compare EXP_A EXP_B [--budget-gib ...] [--out DIR]
    qlora-sweep export EXPERIMENT_DIR [--trial best|ID] [--merge] --out DIR
    qlora-sweep resume EXPERIMENT_DIR [--restart-errored] [--address ADDR]
    qlora-sweep completion bash|zsh|tcsh

Bad input exits with status 2 and a message naming the key or data row, the bad value and the
fix; it never prints a traceback and never starts training.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

from core.errors import QloraSweepError
from core.redact import redact

PROJECT_ROOT = Path(__file__).resolve().parent.parent

DESCRIPTION = """\
Find the best QLoRA fine-tuning setup for a model under a GPU-memory budget.

A sweep spec (YAML) names a base model, data and a search space over LoRA rank, alpha, target
modules, learning rate and more. `run` launches Ray Tune trials proposed by Optuna and stopped
early by ASHA; each trial trains a 4-bit (NF4) quantized model with LoRA adapters and reports its
eval loss and peak memory. The report compares quality against memory.

Start with:  qlora-sweep run sweeps/smoke.yaml     (a real sweep of a tiny model, CPU, about a minute)
"""


def find_spec(value: str) -> Path:
    """Resolve a spec argument: a path, a path relative to the project, or a name in sweeps/.

    `ray submit` runs sweep.py from the head node's home folder, so `--config sweeps/smoke.yaml`
    must also work when the working directory is not the project.
    """
    for candidate in (Path(value), PROJECT_ROOT / value, PROJECT_ROOT / "sweeps" / f"{value}.yaml"):
        if candidate.is_file():
            return candidate
    return Path(value)  # load_spec reports it as missing


def _load(spec_arg: str, overrides: list[str] | None = None):
    from sweeps.spec import load_spec

    return load_spec(find_spec(spec_arg), overrides or ())


@contextlib.contextmanager
def json_stdout(enabled: bool) -> Iterator[Callable[[dict[str, Any]], None]]:
    """With --json, stdout carries exactly one JSON object: everything else this process (and any
    process it starts, Ray's included) writes to file descriptor 1 goes to stderr meanwhile.

    Run as the `qlora-sweep` command (the process is ours until it exits), descriptor 1 stays on
    stderr after the JSON: what Ray's threads and exit handlers print later must not follow the
    object on stdout. Called in-process (`main(argv)`), descriptor 1 is given back.

    Yields:
        A function that writes the JSON object (call it once, at the end).
    """
    if not enabled:
        yield lambda obj: None
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield lambda obj: os.write(saved, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode())
    finally:
        sys.stdout.flush()
        if not _OWN_PROCESS:
            os.dup2(saved, 1)
        os.close(saved)


def cmd_validate(args: argparse.Namespace) -> int:
    with json_stdout(args.json) as emit:
        checked = _validate(args)
        data = checked.data
        emit({
            "valid": True,
            "spec": args.spec,
            "overrides": list(checked.spec.overrides),
            "model": checked.spec.model.path,
            "model_type": checked.model_type,
            "train_rows": data.train_rows if data is not None else None,
            "eval_rows": data.eval_rows if data is not None else None,
            "skipped_rows": len(data.skipped) if data is not None else None,
            "truncated_rows": len(data.truncated) if data is not None else None,
            "not_checked": list(checked.skipped),
        })
    return 0


def _validate(args: argparse.Namespace) -> Any:
    from sweeps.driver import preflight

    spec = _load(args.spec, args.set)
    print(redact(f"schema ok: {args.spec}" + "".join(f" --set {item}" for item in spec.overrides)))
    checked = preflight(spec, offline=args.offline)
    rows = (
        f"{checked.data.train_rows} train / {checked.data.eval_rows} eval rows"
        + (f", {len(checked.data.skipped)} bad rows will be skipped" if checked.data.skipped else "")
        + (f", {len(checked.data.truncated)} long rows will be truncated" if checked.data.truncated else "")
        if checked.data is not None
        else "data not read"
    )
    print(f"preflight ok: model {spec.model.path} ({checked.model_type}), {rows}")
    for what in checked.skipped:
        print(f"not checked{' (--offline)' if args.offline else ''}: {what}")
    return checked


def cmd_estimate(args: argparse.Namespace) -> int:
    from sweeps.estimate import run_estimate

    print(run_estimate(_load(args.spec, args.set), args.gpu_gib, args.json))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from sweeps.driver import run_sweep

    with json_stdout(getattr(args, "json", False)) as emit:
        spec = _load(args.spec, args.set)
        outcome = run_sweep(spec, storage_override=args.storage, name=args.name, address=args.address)
        emit(run_summary(outcome))
    return _exit_status(outcome)


def _exit_status(outcome: Any) -> int:
    from sweeps.driver import INTERRUPTED_EXIT

    if outcome.interrupted:
        return INTERRUPTED_EXIT[outcome.interrupted]
    return 1 if outcome.num_failed else 0


def run_summary(outcome: Any) -> dict[str, Any]:
    """The object `run --json` and `resume --json` print (docs/scripting.md)."""
    return {
        "exit_status": _exit_status(outcome),
        "interrupted": outcome.interrupted,
        "resume_command": f"qlora-sweep resume {outcome.experiment_dir}" if outcome.interrupted else None,
        "failed": outcome.num_failed,
        **outcome.summary,
    }


def cmd_resume(args: argparse.Namespace) -> int:
    from sweeps.driver import resume_sweep

    with json_stdout(getattr(args, "json", False)) as emit:
        outcome = resume_sweep(
            args.resume, restart_errored=args.restart_errored, address=args.address,
            trust_experiment=getattr(args, "trust_experiment", False),
        )
        emit(run_summary(outcome))
    return _exit_status(outcome)


def cmd_report(args: argparse.Namespace) -> int:
    from analysis.report import write_report

    with json_stdout(args.json) as emit:
        outcome = write_report(args.experiment, out_dir=args.out, budgets_gib=args.budget_gib)
        for line in outcome.summary_lines:
            print(line)
        print(f"report: {redact(outcome.report_dir)}/report.html (and {', '.join(f for f in outcome.files if f != 'report.html')})")
        emit(outcome.summary)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from analysis.compare import compare_experiments

    with json_stdout(args.json) as emit:
        outcome = compare_experiments(args.experiments, out_dir=args.out, budgets_gib=args.budget_gib)
        for line in outcome.summary_lines:
            print(line)
        print(f"comparison: {outcome.out_dir}/compare.html")
        emit({"out_dir": outcome.out_dir, "files": list(outcome.files), "experiments": list(args.experiments),
              "summary": list(outcome.summary_lines)})
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from analysis.export import export_trial

    outcome = export_trial(
        args.experiment, args.out, trial=args.trial, merge=args.merge, push_to_hub=args.push_to_hub, private=args.private
    )
    print(f"exported trial {outcome.trial_id} to {redact(outcome.out_dir)} (README.md, a model card, says how to load it)")
    if outcome.pushed_url:
        print(f"pushed to the Hugging Face Hub: {outcome.pushed_url}")
    if outcome.check_passed is False:
        print(
            f"error: the merged model's eval loss differs from the unmerged one by {outcome.merge_difference:.3g}, "
            f"more than the tolerance ({outcome.tolerance:g} relative); see {outcome.out_dir}/README.md",
            file=sys.stderr,
        )
        return 1
    return 0


def budget_gib(value: str) -> float:
    """A --budget-gib value: a positive number of GiB."""
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number of GiB; write e.g. --budget-gib 8 16 24")
    return number


def gpu_gib(value: str) -> float:
    """An --gpu-gib value: a positive number of GiB."""
    try:
        return budget_gib(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number of GiB; write e.g. --gpu-gib 16 24") from None


def add_budget_argument(parser: argparse.ArgumentParser) -> None:
    from trainables.metrics import DEFAULT_BUDGETS_GIB

    parser.add_argument(
        "--budget-gib",
        nargs="+",
        type=budget_gib,
        default=list(DEFAULT_BUDGETS_GIB),
        metavar="GIB",
        help=f"VRAM budgets for 'best under budget' (default: {' '.join(f'{b:g}' for b in DEFAULT_BUDGETS_GIB)})",
    )


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    from sweeps.spec import OVERRIDE_HELP

    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=OVERRIDE_HELP)


JSON_HELP = "print one JSON object on stdout (the rest of the output goes to stderr); see docs/scripting.md"


def add_json_argument(parser: argparse.ArgumentParser, help: str = JSON_HELP) -> None:
    parser.add_argument("--json", action="store_true", help=help)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    add_set_argument(parser)
    parser.add_argument(
        "--storage", help="where experiments go: a folder or s3://bucket/prefix (default: the spec's storage key)"
    )
    parser.add_argument("--name", help="experiment folder name (default: SPEC_NAME-YYYYmmdd-HHMMSS)")
    parser.add_argument("--address", help=ADDRESS_HELP)


EXIT_STATUSES = """exit statuses:
  0    the sweep ran and every trial ended as the search decided (completed, stopped early, oom,
       diverged or infeasible are answers about a configuration, not failures)
  1    the sweep ran but some trials failed (raised after train.max_failures retries, or lost their
       node for good): the report lists them, `qlora-sweep resume DIR --restart-errored` runs them again;
       or timed out (status timed_out: past train.trial_timeout_s, or hung for train.stall_timeout_s)
  2    bad input (spec, data, model, storage, --name), or the experiment folder is in use by another
       driver (one `run`/`resume` per experiment; the error names the holder): nothing was started
  130  stopped by Ctrl-C (SIGINT), 143 by SIGTERM: no new trials were started, the running ones were
       saved at their last checkpoint and the partial report written; `qlora-sweep resume DIR` goes on.
       A second signal stops at once.
"""

ADDRESS_HELP = (
    "Ray cluster to join (default: the running cluster if there is one, else a new local one; "
    "'local' always starts a local cluster bound to 127.0.0.1)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora-sweep", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run a sweep and write its report",
        description="Run a sweep and write its report.",
        epilog=EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("spec", metavar="SPEC", help="sweep YAML, e.g. sweeps/smoke.yaml")
    add_run_arguments(run)
    add_json_argument(run)
    run.set_defaults(func=cmd_run)

    validate = sub.add_parser(
        "validate",
        help="check a spec, its model and data without training",
        description="Check a sweep spec: schema, model config, target modules, data rows, storage. "
        "Reports every problem at once and exits 2 if there is any.",
    )
    validate.add_argument("spec", metavar="SPEC")
    add_set_argument(validate)
    add_json_argument(validate)
    validate.add_argument(
        "--offline",
        action="store_true",
        help="skip the checks that need a model/dataset hub or cloud storage, and list them "
        "(for specs meant for another machine)",
    )
    validate.set_defaults(func=cmd_validate)

    estimate = sub.add_parser(
        "estimate",
        help="predict the peak GPU memory of the space's corners, from the model config alone",
        description="Predict the peak GPU memory of the corners of the search space (smallest and largest rank x each "
        "target-module choice x smallest and largest micro-batch, at data.max_seq_length), part by part, and which GPU "
        "sizes each fits. Reads only the model's config (no weights, no GPU). See docs/memory.md.",
    )
    estimate.add_argument("spec", metavar="SPEC")
    add_set_argument(estimate)
    estimate.add_argument("--json", action="store_true", help="one JSON object per configuration, with every part")
    estimate.add_argument(
        "--gpu-gib",
        nargs="+",
        type=gpu_gib,
        default=[8.0, 16.0, 24.0, 40.0, 48.0, 80.0],
        metavar="GIB",
        help="GPU sizes to check (default: 8 16 24 40 48 80)",
    )
    estimate.set_defaults(func=cmd_estimate)

    report = sub.add_parser(
        "report",
        help="(re)write an experiment's report; works while the sweep runs",
        description="Write EXPERIMENT_DIR/report/: report.html (self-contained), report.md, trials.csv, "
        "trials.parquet and plots/. While the sweep runs it shows the partial results. See docs/report.md.",
    )
    report.add_argument("experiment", metavar="EXPERIMENT_DIR", help="a folder (or s3:// URI) that `run` printed")
    add_budget_argument(report)
    report.add_argument("--out", help="write the report here instead of EXPERIMENT_DIR/report")
    add_json_argument(report)
    report.set_defaults(func=cmd_report)

    compare = sub.add_parser(
        "compare",
        help="put two sweeps side by side (e.g. one space on two base models)",
        description="Write compare.html, compare.md and compare.csv: the best trial of each sweep, the best under "
        "each budget, the Pareto fronts on one chart, and the spec keys that differ.",
    )
    compare.add_argument("experiments", nargs=2, metavar="EXPERIMENT_DIR", help="two folders (or s3:// URIs)")
    add_budget_argument(compare)
    compare.add_argument("--out", help="default: compare-A-vs-B next to the first experiment")
    add_json_argument(compare)
    compare.set_defaults(func=cmd_compare)

    export = sub.add_parser(
        "export",
        help="copy a trial's adapter (optionally merged into the base) for deployment",
        description="Copy the trial's best checkpoint's adapter and tokenizer, without the training state, into "
        "--out (PeftModel.from_pretrained loads it), with a README saying how to load it. --merge also saves "
        "the adapter merged into the unquantized base under --out/merged and checks that its eval loss matches "
        "the unmerged model's. See docs/report.md.",
    )
    export.add_argument("experiment", metavar="EXPERIMENT_DIR", help="a folder (or s3:// URI) that `run` printed")
    export.add_argument("--trial", default="best", help="'best' (default) or a trial id from the report")
    export.add_argument("--merge", action="store_true", help="also save a standalone merged model and check its loss")
    export.add_argument("--out", required=True, help="a new (or earlier export's) local folder")
    export.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="also upload the folder to this Hugging Face Hub model repo (USER_OR_ORG/NAME), creating it if needed; "
        "uses HF_TOKEN or your `hf auth login`. Without it nothing leaves this machine",
    )
    export.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    export.set_defaults(func=cmd_export)

    resume = sub.add_parser(
        "resume",
        help="continue an interrupted sweep from its experiment folder",
        description="Continue a sweep that was interrupted (driver killed, Ctrl+C, lost head node): "
        "unfinished trials continue from their latest checkpoints, finished trials are kept, and the "
        "Optuna searcher continues its study (restored from the experiment if this machine lacks it, e.g. a new "
        "head node resuming from s3://). Only folders written by `qlora-sweep run` are accepted, and only when "
        "the digests of Tune's pickled state match this machine's experiment key (or --trust-experiment), "
        "because resuming unpickles that state. See docs/resume.md.",
        epilog=EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    resume.add_argument("resume", metavar="EXPERIMENT_DIR", help="the folder (or s3:// URI) that `run` printed")
    resume.add_argument("--address", help=ADDRESS_HELP)
    add_resume_arguments(resume)
    add_json_argument(resume)
    resume.set_defaults(func=cmd_resume)

    completion = sub.add_parser(
        "completion",
        help="print a shell completion script (bash, zsh or tcsh)",
        description="Print a completion script for the subcommands and flags. Install it with e.g.\n"
        "  qlora-sweep completion bash > ~/.local/share/bash-completion/completions/qlora-sweep\n"
        "  qlora-sweep completion zsh > \"${fpath[1]}/_qlora-sweep\"",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    completion.add_argument("shell", choices=["bash", "zsh", "tcsh"])
    completion.set_defaults(func=cmd_completion)
    return parser


# Completion of argument values: spec files, experiment folders, output folders.
_COMPLETE_FILES = {"spec"}
_COMPLETE_DIRS = {"experiment", "experiments", "resume", "out", "storage"}


def cmd_completion(args: argparse.Namespace) -> int:
    import shtab

    parser = build_parser()
    for command in parser._subparsers._group_actions[0].choices.values():  # argparse keeps subparsers there
        for action in command._actions:
            if action.dest in _COMPLETE_FILES:
                action.complete = shtab.FILE
            elif action.dest in _COMPLETE_DIRS:
                action.complete = shtab.DIRECTORY
    print(shtab.complete(parser, shell=args.shell))
    return 0


def add_resume_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--restart-errored",
        action="store_true",
        help="run errored trials again from scratch (new trial ids) instead of keeping them failed",
    )
    parser.add_argument(
        "--trust-experiment",
        action="store_true",
        help="resume even though Tune's pickled state has no valid digest under this machine's experiment key "
        "(e.g. a sweep from before digests, or from a machine whose key you do not have). Unpickling can run any "
        "code: only for folders whose every writer you trust. See docs/resume.md",
    )


def handle_errors(func: Callable[[], int]) -> int:
    """Turn expected failures into one clear message and their exit status (2), without a traceback.

    Every error the user can fix derives from core.errors.QloraSweepError: the spec's SpecError,
    the data's DataError, analysis' AnalysisInputError (and NotAnExperiment).
    """
    try:
        return func()
    except QloraSweepError as exc:
        print(f"error: {redact(exc.render())}", file=sys.stderr)  # no password or key of a URL in it
        return exc.exit_code
    except BrokenPipeError:  # `qlora-sweep ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted. Finished trials are saved; continue with `qlora-sweep resume EXPERIMENT_DIR`.", file=sys.stderr)
        return 130


# Set by `main()` run as the command itself (no argv given): see json_stdout.
_OWN_PROCESS = False


def main(argv: list[str] | None = None) -> int:
    global _OWN_PROCESS
    from sweeps.driver import quiet_driver

    _OWN_PROCESS = argv is None

    quiet_driver()
    args = build_parser().parse_args(argv)
    return handle_errors(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
