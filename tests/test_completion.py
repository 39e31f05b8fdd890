"""`qlora-sweep completion bash`: the generated script, sourced in a real bash, completes the
subcommands and each subcommand's flags as argparse defines them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from sweeps.cli import build_parser
from tests.cli_runs import QLORA_SWEEP

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def complete(script: Path, *words: str) -> list[str]:
    """What bash offers for the last word of `qlora-sweep WORDS...`, through the script's own function."""
    line = " ".join(("qlora-sweep", *words))
    program = (
        f"source {script}\n"
        f"COMP_WORDS=(qlora-sweep {' '.join(repr(w) for w in words)}); COMP_CWORD={len(words)}\n"
        f"COMP_LINE={line!r}; COMP_POINT=${{#COMP_LINE}}\n"
        'fn=$(complete -p qlora-sweep | sed -E "s/.*-F ([^ ]+).*/\\1/")\n'
        f'"$fn" qlora-sweep {words[-1]!r} {words[-2] if len(words) > 1 else "qlora-sweep"!r}\n'
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return sorted(w.strip() for w in done.stdout.splitlines() if w.strip())


def test_bash_completes_subcommands_and_their_flags(tmp_path: Path) -> None:
    script = tmp_path / "qlora-sweep.bash"
    done = subprocess.run([QLORA_SWEEP, "completion", "bash"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    script.write_text(done.stdout)
    subparsers = build_parser()._subparsers._group_actions[0].choices
    commands = sorted(subparsers)
    assert complete(script, "") == commands
    assert complete(script, "re") == ["report", "resume"]
    assert complete(script, "run", "--s") == ["--set", "--storage"]
    for command in ("run", "resume", "report"):  # every long flag argparse knows, nothing else
        flags = sorted(o for a in subparsers[command]._actions for o in a.option_strings if o.startswith("--"))
        assert complete(script, command, "--") == flags
    assert complete(script, "export", "--m") == ["--merge"]
    for shell in ("zsh", "tcsh"):
        other = subprocess.run([QLORA_SWEEP, "completion", shell], capture_output=True, text=True, timeout=60)
        assert other.returncode == 0 and "qlora-sweep" in other.stdout
