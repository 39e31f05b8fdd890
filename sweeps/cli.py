"""`qlora-sweep`: one console script, one subcommand per job.

    qlora-sweep run SPEC [--storage DIR] [--name NAME] [--address ADDR]
    qlora-sweep validate SPEC
    qlora-sweep report EXPERIMENT_DIR [--out DIR]

Bad input exits with status 2 and a message naming the key or data row, the bad value and the
fix; it never prints a traceback and never starts training.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXIT_BAD_INPUT = 2

DESCRIPTION = """\
Find the best QLoRA fine-tuning setup for a model under a GPU-memory budget.

A sweep spec (YAML) names a base model, data and a search space over LoRA rank, alpha, target
modules, learning rate and more. `run` launches Ray Tune trials proposed by Optuna and stopped
early by ASHA; each trial trains a 4-bit (NF4) quantized model with LoRA adapters and reports its
eval loss and peak memory. The report compares quality against memory.

Start with:  qlora-sweep run sweeps/smoke.yaml     (a real sweep of a tiny model, CPU, ~3 min)
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


def _load(spec_arg: str):
    from sweeps.spec import load_spec

    return load_spec(find_spec(spec_arg))


def cmd_validate(args: argparse.Namespace) -> int:
    from sweeps.driver import preflight

    spec = _load(args.spec)
    print(f"schema ok: {args.spec}")
    checked = preflight(spec)
    print(
        f"preflight ok: model {spec.model.path} ({checked.model_type}), "
        f"{len(checked.data.train)} train / {len(checked.data.eval)} eval rows"
        + (f", {len(checked.data.skipped)} bad rows will be skipped" if checked.data.skipped else "")
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from sweeps.driver import run_sweep

    spec = _load(args.spec)
    outcome = run_sweep(spec, storage_override=args.storage, name=args.name, address=args.address)
    return 1 if outcome.num_errors and outcome.num_errors == outcome.num_trials else 0


def cmd_report(args: argparse.Namespace) -> int:
    from analysis.report import write_report

    outcome = write_report(args.experiment, out_dir=args.out)
    for line in outcome.summary_lines:
        print(line)
    print(f"report: {outcome.report_dir} ({', '.join(outcome.files)})")
    return 0


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage", help="where experiments go: a folder or s3://bucket/prefix (default: the spec's storage key)"
    )
    parser.add_argument("--name", help="experiment folder name (default: SPEC_NAME-YYYYmmdd-HHMMSS)")
    parser.add_argument(
        "--address",
        help="Ray cluster to join (default: the running cluster if there is one, else a new local one; "
        "'local' always starts a local cluster bound to 127.0.0.1)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora-sweep", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a sweep and write its report", description="Run a sweep and write its report.")
    run.add_argument("spec", metavar="SPEC", help="sweep YAML, e.g. sweeps/smoke.yaml")
    add_run_arguments(run)
    run.set_defaults(func=cmd_run)

    validate = sub.add_parser(
        "validate",
        help="check a spec, its model and data without training",
        description="Check a sweep spec: schema, model config, target modules, data rows, storage. "
        "Reports every problem at once and exits 2 if there is any.",
    )
    validate.add_argument("spec", metavar="SPEC")
    validate.set_defaults(func=cmd_validate)

    report = sub.add_parser(
        "report",
        help="(re)write an experiment's report; works while the sweep runs",
        description="Write EXPERIMENT_DIR/report/: trials.csv and report.md.",
    )
    report.add_argument("experiment", metavar="EXPERIMENT_DIR", help="a folder (or s3:// URI) that `run` printed")
    report.add_argument("--out", help="write the report here instead of EXPERIMENT_DIR/report")
    report.set_defaults(func=cmd_report)
    return parser


def handle_errors(func: Callable[[], int]) -> int:
    """Turn expected failures into one clear message and exit status 2, without a traceback."""
    from analysis.results import NotAnExperiment
    from sweeps.spec import SpecError
    from trainables.data import DataError

    try:
        return func()
    except (SpecError, DataError) as exc:
        print(f"error: {exc.render()}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NotAnExperiment as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("\ninterrupted. Finished trials are saved; continue with `qlora-sweep resume EXPERIMENT_DIR`.", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    from sweeps.driver import quiet_driver

    quiet_driver()
    args = build_parser().parse_args(argv)
    return handle_errors(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
