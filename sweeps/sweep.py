"""Entry point for `ray submit cluster.yaml sweeps/sweep.py -- --config SPEC`.

`ray submit` copies this file to the head node and runs it there, where the project is installed
(cluster.yaml's setup_commands). It joins the running cluster (address="auto") and otherwise
starts a local one, exactly like `qlora-sweep run SPEC`, with which it shares one code path.

    python sweeps/sweep.py --config sweeps/smoke.yaml [--storage DIR] [--name NAME] [--address ADDR]
    python sweeps/sweep.py --resume EXPERIMENT_DIR [--restart-errored] [--address ADDR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run as a script, Python puts this file's folder first on sys.path; drop it so that sibling
# modules (spec.py, driver.py, ...) are imported as the `sweeps` package, not as top-level names.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)


def main(argv: list[str] | None = None) -> int:
    from sweeps.cli import add_resume_arguments, add_run_arguments, cmd_resume, cmd_run, handle_errors

    parser = argparse.ArgumentParser(
        prog="sweep.py",
        description="Run a qlora-sweep sweep on the Ray cluster this runs on (what `ray submit` calls).",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", metavar="SPEC", help="sweep YAML, e.g. sweeps/smoke.yaml")
    what.add_argument(
        "--resume", metavar="EXPERIMENT_DIR", help="continue an interrupted sweep (same as `qlora-sweep resume`)"
    )
    add_run_arguments(parser)
    add_resume_arguments(parser)
    args = parser.parse_args(argv)
    if args.resume:
        if args.storage or args.name:
            parser.error("--storage and --name apply to --config; a resumed sweep stays where it was")
        return handle_errors(lambda: cmd_resume(args))
    args.spec = args.config
    return handle_errors(lambda: cmd_run(args))


if __name__ == "__main__":
    sys.exit(main())
