"""Task metrics: what a trial's adapter gets right, measured inside the trial (spec section `eval:`).

Every metric is declared here once with its direction: the builtin types in `METRIC_TYPES`, a user's
`python:` metric with the direction its spec entry declares. sweeps/spec.py validates `search.metric`
and `search.objectives` against these names and takes ASHA's and Optuna's direction from them; the
trainable reports each under its name after the evaluation rounds `EvalJob.rounds` lists (NaN after
the others, which ASHA and the searcher skip); analysis/ ranks and correlates by them.

The examples are a fixed, seeded subset of the eval split (`max_examples`, `seed`), the same for every
trial and round. A row's prompt is its tokens before the first loss token, its reference the loss tokens
(end-of-sequence included), exactly as trained.

* `exact_match` without `extract` or `normalize` is computed teacher-forced: a row is right exactly when
  every reference token, EOS included, is the argmax after the tokens before it, which is what greedy
  decoding would produce; one forward pass. Otherwise it, and every other metric that reads text, uses
  batched greedy generation with left padding (one generation per evaluation, shared by the metrics).
* `rouge_l`: the rouge-score package's ROUGE-L F-measure, averaged.
* `math_verify`: the math-verify package's `verify(parse(reference), parse(generation))`, averaged,
  with its own timeouts, in a child process (trainables/math_answers.py).
* `python`: `path/file.py:function` or `package.module:function`, called as
  `function(prompts=..., generations=..., references=...)`, returning a number or a dict of numbers. A
  file's source travels inside the trial's job (no shared disk).
* `forgetting`: mean token loss on a general held-out text set with the adapter minus without it
  (peft's `disable_adapter`, measured once per training attempt); also reported: `<name>_loss`,
  `<name>_base_loss`.
* `lm_eval`: tasks of EleutherAI's lm-evaluation-harness that local task YAML files (`include_path`)
  define over local data, the first `limit` documents of each, scored on the in-memory adapter model
  (trainables/lm_eval_metric.py); the mean of `metric` over the tasks, and each task's as
  `<name>_<task>`. Its files travel inside the trial's job. Higher is better unless `direction` says.

Each evaluation also reports `task_eval_s` (seconds) and `task_eval_peak_mib` (peak memory while the
task evaluation ran; its kind is the trial's memory_kind).
"""

from __future__ import annotations

import importlib
import math
import re
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from trainables.lm_eval_metric import task_column
from trainables.settings import PathText, Seed, Strict

Direction = Literal["lower", "higher"]

# Builtin metric types and their direction (python: the spec entry declares it).
METRIC_TYPES: dict[str, Direction | None] = {
    "exact_match": "higher",
    "rouge_l": "higher",
    "math_verify": "higher",
    "forgetting": "lower",
    "python": None,
    "lm_eval": "higher",  # the default; `direction:` may say lower (a perplexity-like task metric)
}
NORMALIZATIONS = ("strip", "lower", "remove_commas")
# Reported by every task evaluation (declared in trainables/metrics.py too, with units).
COST_METRICS = ("task_eval_s", "task_eval_peak_mib")
METRIC_NAME = r"^[a-z][a-z0-9_]*$"
PYTHON_TARGET = re.compile(r"^(?P<target>[^:]+?\.py|[A-Za-z_]\w*(\.[A-Za-z_]\w*)*):(?P<function>[A-Za-z_]\w*)$")
DEFAULT_MAX_EXAMPLES = 64


class MetricSpec(Strict):
    """One task metric of `eval.metrics`. A bare string is the builtin type of that name."""

    type: Literal["exact_match", "rouge_l", "math_verify", "forgetting", "python", "lm_eval"]
    name: Annotated[str, Field(pattern=METRIC_NAME, max_length=64)] | None = Field(
        default=None, description="What the metric is reported as (search.metric, trials-table columns). Omitted: its type."
    )
    direction: Direction | None = Field(
        default=None,
        description="higher or lower is better; required for python:, fixed for the builtin types, higher unless set "
        "for lm_eval.",
    )
    extract: str | None = Field(
        default=None,
        description="A regex applied to generation and reference before comparing; its first group (or the whole "
        "match) is the answer, e.g. '#### (-?[0-9.,]+)' for GSM8K. A generation without a match is wrong.",
    )
    normalize: tuple[Literal["strip", "lower", "remove_commas"], ...] = Field(
        default=(), description="Applied to both answers after extraction: strip, lower, remove_commas."
    )
    mode: Literal["auto", "teacher_forced", "generate"] = Field(
        default="auto",
        description="exact_match only. auto: teacher-forced (one forward pass) when there is no extract and no "
        "normalize, else generated.",
    )
    python: str | None = Field(default=None, description="path/to/file.py:function or package.module:function.")
    key: str | None = Field(default=None, description="python: the entry of a returned dict that is the metric.")
    path: PathText | None = Field(
        default=None,
        description="forgetting: a general held-out text set (.txt, one text a line, or .jsonl with a `text` field), "
        "relative to the spec file.",
    )
    tasks: tuple[str, ...] = Field(
        default=(), description="lm_eval: the lm-eval task names to run, defined by the YAML files in include_path."
    )
    include_path: PathText | None = Field(
        default=None,
        description="lm_eval: a folder of lm-eval task YAML files, relative to the spec file; data paths in them "
        "are relative to the YAML file. Its files (and their local data) travel in each trial's job.",
    )
    limit: int | None = Field(
        default=None,
        description="lm_eval: examples per task per evaluation (the first `limit` documents of each task), required: "
        "every evaluation pays for them.",
    )
    metric: str | None = Field(
        default=None,
        description="lm_eval: the lm-eval metric key reported, e.g. acc, acc_norm, exact_match, or metric,filter "
        "(exact_match,strict-match). Omitted: acc.",
    )

    @field_validator("tasks", mode="before")
    @classmethod
    def _task_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("limit")
    @classmethod
    def _positive_limit(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("give a positive whole number of examples per task and evaluation, e.g. limit: 100")
        return value

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"type": value}
        if isinstance(value, dict) and "python" in value and "type" not in value:
            return {**value, "type": "python"}
        return value

    @field_validator("extract")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression ({exc}); e.g. '#### (-?[0-9.,]+)'") from None
        return value

    @field_validator("python")
    @classmethod
    def _python_target(cls, value: str | None) -> str | None:
        if value is not None and not PYTHON_TARGET.match(value):
            raise ValueError("write path/to/file.py:function or package.module:function")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> MetricSpec:
        fixed = METRIC_TYPES[self.type]
        if self.type == "lm_eval":
            self._lm_eval_consistent()
        elif self.tasks or self.include_path is not None or self.limit is not None or self.metric is not None:
            raise ValueError(f"`tasks`, `include_path`, `limit` and `metric` are for lm_eval only; {self.type} does not take them")
        if self.type == "python":
            if self.python is None:
                raise ValueError("a python metric needs `python: path/to/file.py:function`")
            if self.direction is None:
                raise ValueError(f"python metric {self.python!r} needs `direction: higher` or `direction: lower`")
            if self.name is None:
                raise ValueError(f"python metric {self.python!r} needs a `name` (what it is reported as)")
        elif self.type != "lm_eval" and self.direction is not None and self.direction != fixed:
            raise ValueError(f"{self.type} is {fixed}-is-better; remove `direction: {self.direction}`")
        if self.type == "forgetting" and self.path is None:
            raise ValueError("forgetting needs `path:` a file of general held-out text (.txt lines or .jsonl with text)")
        if self.type != "forgetting" and self.path is not None:
            where = "the tasks of include_path" if self.type == "lm_eval" else "the eval split"
            raise ValueError(f"`path` is for forgetting only; {self.type} evaluates on {where}")
        if self.type != "exact_match" and self.mode != "auto":
            how = "scores as its task YAML says" if self.type == "lm_eval" else "always generates"
            raise ValueError(f"`mode` is for exact_match only; {self.type} {how}")
        if self.mode == "teacher_forced" and (self.extract or self.normalize):
            raise ValueError("teacher_forced compares tokens, so it cannot extract or normalize; use mode: generate")
        if self.type in ("forgetting",) and (self.extract or self.normalize):
            raise ValueError("forgetting measures loss; extract and normalize do not apply")
        if self.type == "lm_eval" and (self.extract or self.normalize):
            raise ValueError("lm_eval tasks extract and normalize as their YAML says (filter_list); remove extract and normalize")
        if self.type != "python" and (self.python or self.key):
            raise ValueError("`python` and `key` are for python metrics only")
        return self

    def _lm_eval_consistent(self) -> None:
        if not self.tasks:
            raise ValueError(
                "lm_eval needs `tasks:` the lm-eval task names to run, e.g. [my_task], defined by the YAML files in include_path"
            )
        if self.include_path is None:
            raise ValueError(
                "lm_eval needs `include_path:` a folder of lm-eval task YAML files, relative to the spec file (trials do not "
                "download lm-eval's builtin tasks or their data from the hub)"
            )
        if self.limit is None:
            raise ValueError(
                "lm_eval needs `limit:` how many examples of each task one evaluation scores (a positive whole number, "
                "e.g. limit: 100); every evaluation pays for them"
            )
        if any(not t.strip() for t in self.tasks):
            raise ValueError("lm_eval `tasks` holds an empty name; list lm-eval task names")
        twice = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
        if twice:
            raise ValueError(f"lm_eval task {twice[0]!r} is listed twice in `tasks`; list each task once")
        columns = [task_column(t) for t in self.tasks]
        for column in columns:
            if columns.count(column) > 1:
                both = [t for t, c in zip(self.tasks, columns) if c == column]
                raise ValueError(
                    f"lm_eval tasks {both} would both be reported as {self.metric_name}_{column}; run them as two lm_eval "
                    "metrics with different names"
                )
        if self.metric is not None and not re.match(r"^[A-Za-z_][\w-]*(,[\w.-]+)?$", self.metric):
            raise ValueError(f"`metric: {self.metric}` is not an lm-eval metric key; write e.g. acc, acc_norm or exact_match,strict-match")

    @property
    def lm_eval_metric(self) -> str:
        """The lm-eval metric key of an lm_eval metric (default acc)."""
        return self.metric or "acc"

    @property
    def metric_name(self) -> str:
        return self.name or self.type

    @property
    def better(self) -> Direction:
        return self.direction or METRIC_TYPES[self.type]  # type: ignore[return-value]

    @property
    def teacher_forced(self) -> bool:
        return self.type == "exact_match" and (
            self.mode == "teacher_forced" or (self.mode == "auto" and not self.extract and not self.normalize)
        )

    @property
    def reads_eval_rows(self) -> bool:
        """Whether the metric answers the eval split's prompts (forgetting reads its own set, lm_eval its tasks)."""
        return self.type not in ("forgetting", "lm_eval")

    @property
    def generates(self) -> bool:
        """Whether the metric reads the trial's own generation of the eval rows (lm_eval runs its own requests)."""
        return self.reads_eval_rows and not self.teacher_forced

    def extra_names(self) -> tuple[str, ...]:
        """Descriptive figures reported beside the metric: forgetting's two losses, lm_eval's value per task."""
        if self.type == "forgetting":
            return (f"{self.metric_name}_loss", f"{self.metric_name}_base_loss")
        if self.type == "lm_eval":
            return tuple(f"{self.metric_name}_{task_column(t)}" for t in self.tasks)
        return ()


class EvalSpec(Strict):
    """Task metrics measured inside each trial (docs/task-metrics.md)."""

    metrics: tuple[MetricSpec, ...] = Field(default=(), description="e.g. [exact_match] or {type: rouge_l}, ...")
    max_examples: PositiveInt = Field(
        default=DEFAULT_MAX_EXAMPLES,
        description="A fixed, seeded subset of this many eval rows, the same for every trial and round.",
    )
    max_new_tokens: PositiveInt | None = Field(
        default=None, description="Generation length. Omitted: the longest reference of the subset (EOS included)."
    )
    when: Literal["rungs", "every_round", "final"] = Field(
        default="rungs",
        description="rungs: the rounds where ASHA can stop a trial, plus the last; every_round; final: the last "
        "round only. Other rounds report NaN.",
    )
    batch_size: PositiveInt = Field(default=16, description="Rows per generation / forward batch.")
    seed: Seed = 0

    @field_validator("metrics", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, (str, dict)) else value

    @model_validator(mode="after")
    def _unique(self) -> EvalSpec:
        names = [n for m in self.metrics for n in (m.metric_name, *m.extra_names())]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"metric name {twice[0]!r} is used twice; give one of them another `name:`")
        return self

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.metric_name for m in self.metrics)

    def direction(self, name: str) -> Direction:
        for metric in self.metrics:
            if metric.metric_name == name:
                return metric.better
        raise KeyError(name)

    def reported_names(self) -> tuple[str, ...]:
        """Every key a task evaluation reports (NaN in the rounds without one)."""
        if not self.metrics:
            return ()
        return (*(n for m in self.metrics for n in (m.metric_name, *m.extra_names())), *COST_METRICS)


class EvalJob(BaseModel):
    """What a trial needs to run its task evaluation: the spec, the rounds, and the files it names.

    Attributes:
        spec: The eval section.
        rounds: Evaluation rounds (1-based) after which the task metrics are measured.
        forgetting_texts: Per forgetting metric name, its general held-out texts (read by the driver).
        python_sources: Per python metric name whose target is a file, (file name, source text).
        lm_eval_files: Per lm_eval metric name, its task and data files by their place in the folder the
            worker writes them into (trainables/lm_eval_metric.py carry_files), as text.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    spec: EvalSpec
    rounds: tuple[int, ...]
    forgetting_texts: dict[str, tuple[str, ...]] = {}
    python_sources: dict[str, tuple[str, str]] = {}
    lm_eval_files: dict[str, dict[str, str]] = {}


class EvalFilesError(ValueError):
    """The files eval.metrics names cannot be used; `problems` holds one line each (field, file, fix)."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def build_eval_job(spec: EvalSpec, rounds: tuple[int, ...], resolve: Callable[[str], str]) -> EvalJob:
    """The task evaluation of `spec` with the files it names read now, so the job carries them to every
    worker (no shared disk): each forgetting set's texts (at most eval.max_examples), each python metric
    file's source, and each lm_eval metric's task YAML and local data files (trainables/lm_eval_metric.py),
    whose tasks are loaded once from a temporary copy, as a worker will load them. The driver builds it
    for a sweep (sweeps/plan.py); `export` for re-measuring an adapter (analysis/export.py).

    Args:
        spec: The eval section.
        rounds: Evaluation rounds after which trials measure it.
        resolve: Turns a path as written in the spec into one to open (relative to the spec file).

    Raises:
        EvalFilesError: Naming the metric, the file and the fix, when a file cannot be read, the
            function is not in it, lm-eval is not installed, or an lm_eval task cannot be loaded.
    """
    problems: list[str] = []
    texts: dict[str, tuple[str, ...]] = {}
    sources: dict[str, tuple[str, str]] = {}
    lm_eval_files: dict[str, dict[str, str]] = {}
    for i, metric in enumerate(spec.metrics):
        where = f"eval.metrics[{i}] ({metric.metric_name})"
        if metric.type == "forgetting":
            try:
                texts[metric.metric_name] = read_texts(resolve(metric.path), spec.max_examples)
            except ValueError as exc:
                problems.append(f"{where}.path: {exc}")
        if metric.type == "python":
            target, _, _ = metric.python.rpartition(":")
            if target.endswith(".py"):
                file = resolve(target)
                try:
                    with open(file, encoding="utf-8") as f:
                        sources[metric.metric_name] = (file, f.read())
                except (OSError, UnicodeDecodeError) as exc:
                    problems.append(f"{where}.python: cannot read {file} ({exc}); the path is relative to the spec file")
                    continue
            try:
                load_python_metric(metric, sources)
            except Exception as exc:  # the user's module: anything it raises at import is its problem to fix
                problems.append(f"{where}.python: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        if metric.type == "lm_eval":
            problem = _lm_eval_problem(metric, resolve, spec.seed, lm_eval_files)
            if problem:
                problems.append(f"{where}{problem}")
    if problems:
        raise EvalFilesError(problems)
    return EvalJob(spec=spec, rounds=rounds, forgetting_texts=texts, python_sources=sources, lm_eval_files=lm_eval_files)


def _lm_eval_problem(metric: MetricSpec, resolve: Callable[[str], str], seed: int, carried: dict[str, dict[str, str]]) -> str | None:
    """Read an lm_eval metric's files into `carried` and load its tasks from them; the problem
    (".field: message") if lm-eval is missing or a file or task is unusable."""
    from trainables import lm_eval_metric

    if not lm_eval_metric.installed():
        return f": lm-eval is not installed, and this metric runs its tasks; {lm_eval_metric.INSTALL_HINT}"
    try:
        files = lm_eval_metric.carry_files(resolve(metric.include_path))
        lm_eval_metric.check(metric, files, seed)
    except lm_eval_metric.LmEvalProblem as exc:
        return f".{exc.field}: {exc}"
    carried[metric.metric_name] = files
    return None


def read_texts(path: str | Path, limit: int | None = None) -> tuple[str, ...]:
    """A forgetting set: one text a line (.txt), or the `text` field of each JSON line (.jsonl).

    Raises:
        ValueError: Naming the file and the fix when it cannot be read or holds no text.
    """
    import json

    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path} ({exc}); point `path` at a .txt or .jsonl file") from None
    texts: list[str] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                text = json.loads(line).get("text")
            except (ValueError, AttributeError):
                text = None
            if not isinstance(text, str):
                raise ValueError(f"{path} line {number}: not a JSON object with a string `text`; write {{\"text\": \"...\"}}")
        else:
            text = line
        texts.append(text)
    if not texts:
        raise ValueError(f"{path} holds no text; add one sentence a line")
    return tuple(texts[:limit] if limit else texts)


def asha_rounds(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """The rounds at which Ray's ASHA (one bracket) records a trial: ceil(grace * rf**k) below max_t.

    ASHA records a trial at the first report whose training_iteration reaches a milestone; one report
    is one evaluation round, so that is the milestone rounded up.
    """
    rounds, k = [], 0
    while True:
        milestone = grace_period * reduction_factor**k
        if milestone > max_t:
            break
        rounds.append(math.ceil(milestone - 1e-9))
        k += 1
    return rounds


# --- measuring --------------------------------------------------------------------------------


def normalize(text: str, steps: tuple[str, ...]) -> str:
    for step in steps:
        if step == "strip":
            text = text.strip()
        elif step == "lower":
            text = text.lower()
        elif step == "remove_commas":
            text = text.replace(",", "")
    return text


def extract(text: str, pattern: str | None) -> str | None:
    """The answer in `text`: the regex's first group (or whole match), the last one found; None without a match."""
    if pattern is None:
        return text
    matches = list(re.finditer(pattern, text))
    if not matches:
        return None
    last = matches[-1]
    return last.group(1) if last.groups() else last.group(0)


def answers_match(generation: str, reference: str, metric: MetricSpec) -> bool:
    got = extract(generation, metric.extract)
    want = extract(reference, metric.extract)
    if want is None:
        want = reference  # a reference without the pattern is compared whole
    return got is not None and normalize(got, metric.normalize) == normalize(want, metric.normalize)


@dataclass
class Example:
    prompt: list[int]
    reference: list[int]  # the loss tokens as trained, EOS included


@dataclass
class Generated:
    prompts: list[str]
    generations: list[str]
    references: list[str]


def load_python_metric(metric: MetricSpec, sources: dict[str, tuple[str, str]]) -> Callable[..., Any]:
    """The user's function: from the source the job carries, or by importing package.module.

    Raises:
        ValueError: When it cannot be loaded or is not callable.
    """
    target, _, function = metric.python.rpartition(":")  # type: ignore[union-attr]
    if metric.metric_name in sources:
        filename, source = sources[metric.metric_name]
        module = types.ModuleType(f"qlora_sweep_metric_{metric.metric_name}")
        module.__file__ = filename
        exec(compile(source, filename, "exec"), module.__dict__)  # the user's own metric file, as named in the spec
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ValueError(f"eval metric {metric.metric_name}: cannot import {target!r} ({exc})") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise ValueError(f"eval metric {metric.metric_name}: {target} has no function {function!r}")
    return fn


class TaskEvaluator:
    """Measures the task metrics of one training attempt on its fixed subset of eval rows.

    Args:
        job: The eval job.
        tokenizer: The trial's tokenizer.
        eval_tokens: The eval split as trained (trainables/data.py TokenizedRows).
        max_seq_length: data.max_seq_length (forgetting texts are cut to it).
    """

    def __init__(self, job: EvalJob, tokenizer: Any, eval_tokens: Any, max_seq_length: int):
        from trainables.data import sample_indices

        self.job = job
        self.spec = job.spec
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        # Only metrics that answer the eval rows need them: forgetting and lm_eval also suit data.format text.
        answering = [m.metric_name for m in self.spec.metrics if m.reads_eval_rows]
        self.examples: list[Example] = []
        if answering:
            for i in sample_indices(len(eval_tokens), self.spec.max_examples, self.spec.seed):
                ids, mask = eval_tokens.row(i)
                first = mask.index(True)
                if first == 0 or not all(mask[first:]):
                    continue  # no prompt, or the loss is not one span at the end (multi-turn chat): not a task row
                self.examples.append(Example(prompt=ids[:first], reference=ids[first:]))
        if answering and not self.examples:
            raise ValueError(
                f"eval.metrics: no eval row has a prompt followed by its reference for {answering[0]!r} "
                "(data.format text has no prompt); use data.format instruction or chat"
            )
        self.max_new_tokens = self.spec.max_new_tokens or max((len(e.reference) for e in self.examples), default=0)
        self.functions = {
            m.metric_name: load_python_metric(m, job.python_sources) for m in self.spec.metrics if m.type == "python"
        }
        self.base_losses: dict[str, float] = {}
        self._on_batch: Callable[[], None] | None = None
        self.math_verifier = None
        if any(m.type == "math_verify" for m in self.spec.metrics):
            from trainables.math_answers import MathVerifier

            self.math_verifier = MathVerifier()
        # lm_eval: files written and tasks loaded now, before training, so a bad task stops the attempt early.
        self.lm_eval = None
        lm_eval_metrics = [m for m in self.spec.metrics if m.type == "lm_eval"]
        if lm_eval_metrics:
            from trainables.lm_eval_metric import LmEvalRunner

            self.lm_eval = LmEvalRunner(job.lm_eval_files, lm_eval_metrics, tokenizer, self.spec.batch_size, self.spec.seed)

    def evaluate(self, model: Any, probe: Any = None, on_batch: Callable[[], None] | None = None) -> dict[str, Any]:
        """Every metric of the spec for `model` (a peft model), with the seconds and peak memory it took.

        Args:
            model: The peft model.
            probe: The trial's PeakMemoryProbe; its section gives the evaluation's own peak.
            on_batch: Called after every batch (generation, teacher-forced, forgetting, or one lm-eval
                model call, plus once per lm_eval task at its end): the trial's progress beat, so the
                stall watchdog (trainables/watchdog.py) sees a long task evaluation as alive.
        """
        import torch

        self._on_batch = on_batch
        began = time.time()
        was_training = model.training
        model.eval()
        out: dict[str, Any] = {}
        try:
            with torch.no_grad():
                run = (lambda: self._measure(model, out)) if probe is None else (lambda: probe.section(lambda: self._measure(model, out)))
                reading = run()
        finally:
            if was_training:
                model.train()
        out["task_eval_s"] = round(time.time() - began, 3)
        out["task_eval_peak_mib"] = round(reading.peak_memory_mib, 1) if reading is not None else float("nan")
        return out

    def _measure(self, model: Any, out: dict[str, Any]) -> Any:
        generated: Generated | None = None
        for metric in self.spec.metrics:
            name = metric.metric_name
            if metric.type == "forgetting":
                out.update(self._forgetting(model, metric))
                continue
            if metric.type == "lm_eval":
                out.update(self.lm_eval.measure(model, metric, self._on_batch))  # type: ignore[union-attr]
                continue
            if metric.teacher_forced:
                out[name] = self._teacher_forced_exact_match(model)
                continue
            if generated is None:
                generated = self.generate(model)
            out.update(self._score(metric, generated))
        return None

    def _score(self, metric: MetricSpec, g: Generated) -> dict[str, float]:
        name = metric.metric_name
        if metric.type == "exact_match":
            hits = [answers_match(gen, ref, metric) for gen, ref in zip(g.generations, g.references)]
            return {name: sum(hits) / len(hits)}
        if metric.type == "rouge_l":
            from rouge_score import rouge_scorer

            scorer = rouge_scorer.RougeScorer(["rougeL"])
            # A reference without the extraction pattern is scored whole, as exact_match compares it.
            pairs = [(self._answer(ref, metric) or ref, self._answer(gen, metric)) for gen, ref in zip(g.generations, g.references)]
            return {name: sum(scorer.score(ref, gen or "")["rougeL"].fmeasure for ref, gen in pairs) / len(pairs)}
        if metric.type == "math_verify":
            answers = [(self._answer(ref, metric) or ref, self._answer(gen, metric)) for gen, ref in zip(g.generations, g.references)]
            # Scored in a child process, where math-verify's own timeouts work (trainables/math_answers.py).
            verified = iter(self.math_verifier.hits([(want, got) for want, got in answers if got is not None]))
            hits = [got is not None and next(verified) for _, got in answers]
            return {name: sum(hits) / len(hits)}
        value = self.functions[name](prompts=g.prompts, generations=g.generations, references=g.references)
        return {name: _python_value(metric, value)}

    def _answer(self, text: str, metric: MetricSpec) -> str | None:
        found = extract(text, metric.extract)
        return None if found is None else normalize(found, metric.normalize)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _batches(self, items: list[Any]) -> Iterator[list[Any]]:
        """The items in batches of eval.batch_size; `on_batch` runs once each batch is done."""
        size = self.spec.batch_size
        for i in range(0, len(items), size):
            yield items[i : i + size]
            if self._on_batch is not None:
                self._on_batch()

    def _device(self, model: Any) -> Any:
        return next(p.device for p in model.parameters())

    def _teacher_forced_exact_match(self, model: Any) -> float:
        """Right exactly when every reference token (EOS included) is the argmax: what greedy decoding emits."""
        import torch

        device, pad = self._device(model), self.tokenizer.pad_token_id
        right = 0
        for batch in self._batches(self.examples):
            rows = [e.prompt + e.reference for e in batch]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for k, r in enumerate(rows):  # right padding: positions as trained
                ids[k, : len(r)] = torch.tensor(r)
                attention[k, : len(r)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits
            for k, e in enumerate(batch):
                start = len(e.prompt)
                predicted = logits[k, start - 1 : start - 1 + len(e.reference)].argmax(-1).tolist()
                right += predicted == e.reference
        return right / len(self.examples)

    def generate(self, model: Any) -> Generated:
        """Batched greedy generation with left padding, up to max_new_tokens, stopping at EOS."""
        import torch

        device, pad = self._device(model), self.tokenizer.pad_token_id
        eos = self.tokenizer.eos_token_id
        generations: list[str] = []
        for batch in self._batches(self.examples):
            width = max(len(e.prompt) for e in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for k, e in enumerate(batch):
                ids[k, width - len(e.prompt) :] = torch.tensor(e.prompt)
                attention[k, width - len(e.prompt) :] = 1
            output = model.generate(
                input_ids=ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
                eos_token_id=eos,
                use_cache=True,
            )
            for row in output[:, width:].tolist():
                if eos in row:
                    row = row[: row.index(eos)]
                generations.append(self._decode(row))
        return Generated(
            prompts=[self._decode(e.prompt) for e in self.examples],
            generations=generations,
            references=[self._decode(e.reference) for e in self.examples],
        )

    def _forgetting(self, model: Any, metric: MetricSpec) -> dict[str, float]:
        name = metric.metric_name
        texts = self.job.forgetting_texts[name]
        loss = self._text_loss(model, texts)
        if name not in self.base_losses:
            with model.disable_adapter():
                self.base_losses[name] = self._text_loss(model, texts)
        base = self.base_losses[name]
        return {name: loss - base, f"{name}_loss": loss, f"{name}_base_loss": base}

    def _text_loss(self, model: Any, texts: tuple[str, ...]) -> float:
        """Mean token cross-entropy over the texts (each with EOS, cut to max_seq_length)."""
        import torch

        device, pad = self._device(model), self.tokenizer.pad_token_id
        eos = self.tokenizer.eos_token or ""
        total, count = 0.0, 0
        for batch in self._batches(list(texts)):
            rows = [self.tokenizer(t + eos)["input_ids"][: self.max_seq_length] for t in batch]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            labels = torch.full((len(rows), width), -100, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for k, r in enumerate(rows):
                ids[k, : len(r)] = labels[k, : len(r)] = torch.tensor(r)
                attention[k, : len(r)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits.float()
            targets = labels[:, 1:].to(device)
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total += float(losses)
            count += int((targets != -100).sum())
        return total / max(count, 1)


def _python_value(metric: MetricSpec, value: Any) -> float:
    if isinstance(value, dict):
        key = metric.key or (next(iter(value)) if len(value) == 1 else None)
        if key is None or key not in value:
            raise ValueError(
                f"eval metric {metric.metric_name}: {metric.python} returned {sorted(value)}; set `key:` to the entry "
                "that is the metric"
            )
        value = value[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"eval metric {metric.metric_name}: {metric.python} returned {value!r}; return a number")
    return float(value)


@dataclass
class TaskSchedule:
    """When a trial measures its task metrics, and what it reports in the other rounds."""

    job: EvalJob | None
    names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.names = self.job.spec.reported_names() if self.job is not None else ()

    def due(self, round_number: int) -> bool:
        return self.job is not None and round_number in self.job.rounds

    def missing(self) -> dict[str, float]:
        return {name: float("nan") for name in self.names}
