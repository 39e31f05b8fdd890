"""One error base class for everything the user can fix; the CLI renders it without a traceback."""

from __future__ import annotations

# Exit statuses of the command line (README, "Exit statuses"): 2 is bad input.
EXIT_BAD_INPUT = 2
# Bounds on what one error prints, whatever the input: hostile input (a YAML alias bomb, a huge
# value) must not turn into megabytes of error text.
MAX_LISTED_PROBLEMS = 50
MAX_PROBLEM_CHARS = 2000


class QloraSweepError(Exception):
    """Bad input or a refused action that the user can fix; the message says how.

    Subclasses: `ProblemsError` (several problems at once), the spec's `SpecError`, the data's
    `DataError`, analysis' `AnalysisInputError`. `sweeps/cli.py` prints `render()` and exits with
    `exit_code`; nothing that derives from this class should ever reach the user as a traceback.
    """

    exit_code: int = EXIT_BAD_INPUT

    def render(self) -> str:
        return str(self)


class ProblemsError(QloraSweepError):
    """Every problem found in one input, one line each (spec keys, data rows, storage).

    Attributes:
        source: What was read (a file, "preflight", "--name").
        problems: One line per problem, each naming the key or row, the bad value and the fix.
        noun: What the problems are in, for the heading ("the sweep spec", "the data").
    """

    noun = "the input"

    def __init__(self, source: str, problems: list[str], total: int | None = None):
        self.source = source
        self.problems = problems
        self.total = total if total is not None else len(problems)
        super().__init__(self.render())

    def render(self) -> str:
        count = self.total
        head = f"{_clip(self.source)}: {count} problem{'s' if count != 1 else ''} in {self.noun}"
        listed = self.problems[:MAX_LISTED_PROBLEMS]
        lines = [head, *(f"  - {_clip(p)}" for p in listed)]
        if self.total > len(listed):
            lines.append(f"  - ... and {self.total - len(listed)} more")
        return "\n".join(lines)


def _clip(text: str) -> str:
    """One problem line, cut to MAX_PROBLEM_CHARS characters (saying how much was cut)."""
    text = str(text)
    if len(text) <= MAX_PROBLEM_CHARS:
        return text
    return f"{text[:MAX_PROBLEM_CHARS]}... ({len(text) - MAX_PROBLEM_CHARS:,} more characters)"
