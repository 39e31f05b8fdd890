"""`lm_eval` task metrics: EleutherAI lm-evaluation-harness tasks scored on the trial's in-memory adapter.

A spec entry `{type: lm_eval, tasks: [...], include_path: DIR, limit: N, metric: acc}` names tasks that
local lm-eval task YAML files define, over local data files. Workers share no disk with the driver and
never download from the hub, so the files travel inside the trial's job:

* Driver (sweeps/plan.py `eval_job`): `carry_files` reads every task YAML (and `.py` helper) file under
  include_path and every local data file they name (`dataset_kwargs.data_files`, or a `dataset_path`
  that is a local folder), at most `MAX_CARRY_BYTES` in all. Data paths in a YAML file are relative to
  that YAML file (or absolute); they are rewritten to `ROOT` placeholders, and the files keep their
  folder layout under `tasks/`, so `include:` and `!function utils.f` resolve as before. `check` then
  writes the files into a temporary folder and loads the tasks there exactly as a worker will, so an
  unknown task, a hub dataset, bad data or an unknown metric key fails before Ray starts.
* Worker (trainables/task_metrics.py `TaskEvaluator`): `LmEvalRunner` writes the files once per training
  attempt, loads the tasks once (lm-eval's `TaskManager(include_path=..., include_defaults=False)`: the
  builtin tasks are not even indexed), and per evaluation wraps the live peft model in lm-eval's `HFLM`
  and calls `lm_eval.evaluator.evaluate` on the first `limit` documents of each task.

Why `evaluate` and not `simple_evaluate`: simple_evaluate rebuilds the tasks (reloading their data)
on every call, and after every call collects environment info (torch's collect_env, `git describe`
subprocesses), which would cost more than the evaluation itself on a small model. What it does
besides, this module does too: the seeds (python, numpy, torch: eval.seed), num_fewshot 0 where a task
sets none, and the few-shot seed. The seeds are set inside a saved-and-restored RNG state, so the
training that continues afterwards draws the same random numbers as it would have without the
evaluation; stderr bootstrapping is off (bootstrap_iters=0), and no samples are logged.

Progress: the trial's `on_batch` beat runs after every model call lm-eval makes (one request batch of
eval.batch_size: a loglikelihood forward pass or one generate call), and once more per task when the
evaluation ends, so the stall watchdog sees a long lm-eval run as alive.
"""

from __future__ import annotations

import math
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

# An lm_eval entry of eval.metrics (trainables/task_metrics.py MetricSpec, which imports this module:
# typed by name here so that the two do not import each other).
MetricSpec = Any

INSTALL_HINT = "pip install 'qlora-sweep[lmeval]'"
# What the job may carry per lm_eval metric (task files + data): it is pickled to every trial.
MAX_CARRY_BYTES = 50 * 2**20
# Stands for the folder the files are written into, in the carried YAML texts (forces YAML quoting).
ROOT = "@@QLORA_SWEEP_LM_EVAL_ROOT@@"
# Local data the job carries as text. Binary formats (parquet, arrow) would need another encoding.
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".txt")
# datasets' packaged loaders that read local data_files (anything else in dataset_path is a hub id
# or a loading script, which trials do not fetch).
PACKAGED_LOADERS = ("json", "csv", "text")
_SKIPPED_DIRS = {"__pycache__", ".ipynb_checkpoints"}


class LmEvalProblem(ValueError):
    """A problem with an lm_eval metric's files or tasks; `field` is the spec key it belongs to."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def task_column(task: str) -> str:
    """A task name as a metric-name suffix: lower case, anything but [a-z0-9_] as '_'."""
    return re.sub(r"[^a-z0-9_]", "_", task.lower())


def installed() -> bool:
    """Whether lm-eval can be imported (it is an extra: qlora-sweep[lmeval])."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


# --- the YAML files, read and rewritten with lm-eval's `!function` tags intact ----------------------


class _FunctionTag(str):
    """`!function module.name` in a task YAML, kept as written (lm-eval resolves it next to the file)."""


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    pass


class _Dumper(yaml.SafeDumper):
    pass


_Loader.add_constructor("!function", lambda loader, node: _FunctionTag(loader.construct_scalar(node)))
_Dumper.add_representer(_FunctionTag, lambda dumper, value: dumper.represent_scalar("!function", str(value)))


def _load(text: str, where: Path) -> dict[str, Any]:
    try:
        cfg = yaml.load(text, Loader=_Loader)  # noqa: S506 (a safe loader with one extra tag)
    except yaml.YAMLError as exc:
        raise LmEvalProblem("include_path", f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise LmEvalProblem("include_path", f"{where}: a task YAML file must be a mapping of keys (task, dataset_path, ...)")
    return cfg


def _files_under(folder: Path, suffixes: tuple[str, ...]) -> Iterator[Path]:
    for path in sorted(folder.rglob("*")):
        parts = path.relative_to(folder).parts
        if path.is_file() and path.suffix in suffixes and not any(p in _SKIPPED_DIRS or p.startswith(".") for p in parts):
            yield path


def _read(path: Path, field: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LmEvalProblem(field, f"cannot read {path} ({exc}); the job carries text files only") from None


class _Carrier:
    """Collects the data files that task YAML files name, each under its job name (data/<n>-<name>)."""

    def __init__(self) -> None:
        self.data: dict[str, Path] = {}  # job name -> the file it is read from
        self._names: dict[Path, str] = {}

    def data_name(self, path: Path) -> str:
        if path not in self._names:
            self._names[path] = f"data/{len(self.data)}-{path.name}"
            self.data[self._names[path]] = path
        return self._names[path]

    def local(self, value: Any, yaml_path: Path, key: str) -> str:
        """A data file a YAML file names: carried, and written as its place under ROOT."""
        if not isinstance(value, str):
            raise LmEvalProblem("include_path", f"{yaml_path}: {key} holds {value!r}; name a local file")
        if "://" in value or value.startswith("hf:"):
            raise LmEvalProblem(
                "include_path", f"{yaml_path}: {key} is {value!r}, a download; trials use local data only: name a local file"
            )
        if any(c in value for c in "*?["):
            raise LmEvalProblem("include_path", f"{yaml_path}: {key} is the pattern {value!r}; name each file (patterns are not expanded)")
        path = Path(value).expanduser()
        path = (path if path.is_absolute() else yaml_path.parent / path).resolve()
        if not path.is_file():
            raise LmEvalProblem(
                "include_path", f"{yaml_path}: {key} names {value!r}, and {path} is not a file; paths are relative to the YAML file"
            )
        if path.suffix not in DATA_SUFFIXES:
            raise LmEvalProblem(
                "include_path", f"{yaml_path}: {key} names {path.name}; the job carries {', '.join(DATA_SUFFIXES)} files only"
            )
        return f"{ROOT}/{self.data_name(path)}"

    def rewrite(self, cfg: dict[str, Any], yaml_path: Path) -> dict[str, Any]:
        """The YAML mapping with its local data paths pointing under ROOT (and datasets' cache there too)."""
        kwargs = cfg.get("dataset_kwargs")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise LmEvalProblem("include_path", f"{yaml_path}: dataset_kwargs must be a mapping (data_files: ...)")
        if kwargs is not None:
            kwargs = dict(kwargs)
            files = kwargs.get("data_files")
            key = "dataset_kwargs.data_files"
            if isinstance(files, dict):
                kwargs["data_files"] = {
                    split: [self.local(f, yaml_path, f"{key}.{split}") for f in v] if isinstance(v, list)
                    else self.local(v, yaml_path, f"{key}.{split}")
                    for split, v in files.items()
                }
            elif isinstance(files, list):
                kwargs["data_files"] = [self.local(f, yaml_path, key) for f in files]
            elif files is not None:
                kwargs["data_files"] = self.local(files, yaml_path, key)
            if "data_dir" in kwargs:
                raise LmEvalProblem("include_path", f"{yaml_path}: dataset_kwargs.data_dir is not carried; list the files in data_files")
            # datasets' cache of the prepared data goes with the folder, not into the worker's home.
            kwargs.setdefault("cache_dir", f"{ROOT}/datasets-cache")
            cfg = {**cfg, "dataset_kwargs": kwargs}
        path = cfg.get("dataset_path")
        if isinstance(path, str) and path not in PACKAGED_LOADERS:
            local = (yaml_path.parent / Path(path).expanduser()).resolve()
            if local.is_dir():  # a folder of data files: datasets infers the loader from their suffix
                found = list(_files_under(local, DATA_SUFFIXES))
                if not found:
                    raise LmEvalProblem("include_path", f"{yaml_path}: dataset_path {path!r} holds no {', '.join(DATA_SUFFIXES)} files")
                folder = f"data/{len(self.data)}-{local.name}"
                for f in found:
                    self.data[f"{folder}/{f.relative_to(local).as_posix()}"] = f
                cfg = {**cfg, "dataset_path": f"{ROOT}/{folder}"}
        return cfg


def carry_files(include_path: str | Path) -> dict[str, str]:
    """Every file the tasks under `include_path` need, by its place in the job's folder: `tasks/...`
    (the YAML and .py files, rewritten, in their layout) and `data/...` (the local data they name).

    Raises:
        LmEvalProblem: Naming the file and the fix: no folder, no *.yaml task file, unreadable or
            non-local data, or more than MAX_CARRY_BYTES in all.
    """
    folder = Path(include_path)
    if not folder.is_dir():
        raise LmEvalProblem(
            "include_path", f"{folder} is not a folder; point include_path at a folder of lm-eval task YAML files (relative to the spec file)"
        )
    yamls = list(_files_under(folder, (".yaml", ".yml")))
    if not any(p.suffix == ".yaml" for p in yamls):
        raise LmEvalProblem(
            "include_path",
            f"{folder} holds no *.yaml file; put lm-eval task files there (task: NAME, dataset_path: json, "
            "dataset_kwargs: {data_files: {test: data.jsonl}}, output_type, doc_to_text, ...)",
        )
    carrier = _Carrier()
    files: dict[str, str] = {}
    for path in yamls:
        cfg = carrier.rewrite(_load(_read(path, "include_path"), path), path.resolve())
        files[f"tasks/{path.relative_to(folder).as_posix()}"] = yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, allow_unicode=True)
    rest = {f"tasks/{p.relative_to(folder).as_posix()}": p for p in _files_under(folder, (".py",))} | carrier.data
    # Sized before reading: a data file too big to carry is refused without loading it.
    size = sum(len(text.encode("utf-8")) for text in files.values()) + sum(p.stat().st_size for p in rest.values())
    if size > MAX_CARRY_BYTES:
        raise LmEvalProblem(
            "include_path",
            f"the task and data files of {folder} come to {size / 2**20:.1f} MiB; every trial's job carries them, so keep "
            f"them under {MAX_CARRY_BYTES / 2**20:.3g} MiB (score a subset of the data: `limit` reads only the first documents)",
        )
    files.update({name: _read(path, "include_path") for name, path in rest.items()})
    return files


def write_files(files: dict[str, str], root: Path) -> Path:
    """The carried files written under `root`, ROOT replaced by it; returns the tasks folder."""
    text_root = str(root.resolve())
    if "'" in text_root or "\\" in text_root:
        raise ValueError(f"lm_eval: the temporary folder {text_root} holds a quote or backslash; set TMPDIR to a plain path")
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.replace(ROOT, text_root) if path.suffix in (".yaml", ".yml") else text, encoding="utf-8")
    (root / "tasks").mkdir(exist_ok=True)
    return root / "tasks"


# --- loading the tasks ----------------------------------------------------------------------------


def _merged(path: Path, seen: frozenset[Path] = frozenset()) -> dict[str, Any]:
    """A task YAML with its `include:`s merged (their keys first, the file's own win), as lm-eval does."""
    if path in seen:
        raise LmEvalProblem("include_path", f"{path}: include cycle")
    cfg = _load(_read(path, "include_path"), path)
    includes = cfg.pop("include", None)
    merged: dict[str, Any] = {}
    for inc in includes if isinstance(includes, list) else ([includes] if includes else []):
        merged.update(_merged((path.parent / inc).resolve(), seen | {path}))
    merged.update(cfg)
    return merged


def _check_local(task: str, cfg: dict[str, Any], root: Path) -> None:
    """Refuse a task whose data would come from the hub (trials use the carried files only)."""
    if "class" in cfg or "custom_dataset" in cfg:
        return  # a Python task class or a custom loader function: its own code reads its data
    path = cfg.get("dataset_path")
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    where = f"task {task!r}"
    if path is None:
        raise LmEvalProblem("tasks", f"{where} has no dataset_path; write dataset_path: json with dataset_kwargs.data_files")
    if path in PACKAGED_LOADERS:
        if files is None:
            raise LmEvalProblem(
                "tasks", f"{where}: dataset_path {path} needs dataset_kwargs.data_files naming local files (relative to the YAML file)"
            )
        return
    if not str(path).startswith(str(root.resolve())):
        raise LmEvalProblem(
            "tasks",
            f"{where}: dataset_path {path!r} is neither a local folder nor one of {', '.join(PACKAGED_LOADERS)}; trials do not "
            "download datasets: write dataset_path: json with dataset_kwargs.data_files naming local .jsonl files",
        )


@contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's per-call warnings (a model instance, not a name) and datasets' progress bars, off."""
    import logging

    import datasets

    logger = logging.getLogger("lm_eval")
    level = logger.level
    bars = datasets.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def load_tasks(metric: MetricSpec, tasks_folder: Path, seed: int) -> dict[str, Any]:
    """lm-eval's Task objects of `metric.tasks` from the written folder (only it: no builtin tasks),
    with their data loaded, num_fewshot 0 where the YAML sets none, and the few-shot seed.

    Raises:
        LmEvalProblem: Naming the task and the fix: unknown, a group or tag, hub data, a load error,
            a metric key the task does not compute, or a direction that disagrees with the task's.
    """
    from lm_eval.tasks import TaskManager

    with _quiet():
        manager = TaskManager(include_path=str(tasks_folder), include_defaults=False)
    known = set(manager.all_subtasks)
    for task in metric.tasks:
        if task in known:
            continue
        if task in manager.all_groups or task in manager.all_tags:
            raise LmEvalProblem("tasks", f"{task!r} is a group or tag; list its tasks by name ({', '.join(sorted(known)[:20])})")
        raise LmEvalProblem(
            "tasks",
            f"{task!r} is not a task the YAML files of include_path define; they define: "
            f"{', '.join(sorted(known)) or 'none (every task file needs a `task: NAME` key)'}",
        )
    for task in metric.tasks:
        entry = manager.task_index[task]
        if entry.yaml_path is not None:
            _check_local(task, _merged(Path(entry.yaml_path).resolve()), tasks_folder.parent)
    try:
        with _quiet():
            loaded = manager.load(list(metric.tasks))["tasks"]
    except Exception as exc:  # the user's task files and data: whatever lm-eval or datasets raise is theirs to fix
        raise LmEvalProblem("tasks", f"lm-eval cannot load {list(metric.tasks)}: {_first_line(exc)}") from None
    key = metric.lm_eval_metric.split(",")[0]
    for task in metric.tasks:
        obj = loaded[task]
        computed = obj.higher_is_better()
        if key not in computed:
            raise LmEvalProblem(
                "metric", f"task {task!r} computes {', '.join(sorted(computed))}, not {key!r}; set `metric:` to one of them"
            )
        says = "higher" if computed[key] else "lower"
        if says != metric.better:
            raise LmEvalProblem(
                "direction", f"task {task!r} says {key} is {says}-is-better; set `direction: {says}` on this metric"
            )
        if obj.get_config("num_fewshot") is None:
            obj.set_config(key="num_fewshot", value=0)
        obj.set_fewshot_seed(seed=seed)
    return {task: loaded[task] for task in metric.tasks}


def check(metric: MetricSpec, files: dict[str, str], seed: int = 0) -> None:
    """Load the tasks from the carried files in a temporary folder, as a worker will (driver side).

    Raises:
        LmEvalProblem: As `load_tasks`.
    """
    root = Path(tempfile.mkdtemp(prefix="qlora-sweep-lm-eval-check-"))
    try:
        load_tasks(metric, write_files(files, root), seed)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


# --- measuring ------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _trial_lm_class() -> type:
    """HFLM with the trial's progress beat after every model call, and without progress bars.

    Built lazily: importing lm-eval's HF model costs seconds.
    """
    from lm_eval.models.huggingface import HFLM

    class TrialLM(HFLM):
        beat: Callable[[], None] | None = None

        def _beat(self) -> None:
            if self.beat is not None:
                self.beat()

        def _model_call(self, *args: Any, **kwargs: Any) -> Any:
            out = super()._model_call(*args, **kwargs)
            self._beat()
            return out

        def _model_generate(self, *args: Any, **kwargs: Any) -> Any:
            out = super()._model_generate(*args, **kwargs)
            self._beat()
            return out

        def loglikelihood(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().generate_until(requests, disable_tqdm=True)

    return TrialLM


@contextmanager
def seeded(seed: int, device: Any) -> Iterator[None]:
    """python, numpy and torch seeded with `seed` inside, their previous states back afterwards: the
    evaluation is the same every round, and training continues with the random numbers it had."""
    import numpy as np
    import torch

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [device.index or 0] if getattr(device, "type", "cpu") == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def result_value(results: dict[str, Any], task: str, key: str) -> float:
    """The figure lm-eval reports for `key` of `task`: `key` itself when it names a filter
    ("exact_match,strict-match"), else `key,none`, else the one `key,<filter>` there is."""
    row = results[task]
    if "," in key:
        found = key if key in row else None
    elif f"{key},none" in row:
        found = f"{key},none"
    else:
        candidates = [k for k in row if k.split(",")[0] == key]
        found = candidates[0] if len(candidates) == 1 else None
    keys = sorted(k for k in row if "," in k and "_stderr" not in k)
    if found is None:
        raise ValueError(f"lm_eval task {task!r} reported {keys}, not {key!r}; set `metric:` to one of them (metric,filter)")
    value = row[found]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"lm_eval task {task!r} reported {found} = {value!r}, not a number")
    return float(value)


class LmEvalRunner:
    """The lm_eval metrics of one training attempt: their files written once, their tasks loaded once.

    Args:
        files: Per lm_eval metric name, its carried files (EvalJob.lm_eval_files).
        metrics: The lm_eval metrics.
        tokenizer: The trial's tokenizer.
        batch_size: eval.batch_size: requests per model call.
        seed: eval.seed, for python, numpy, torch and the few-shot sampler.
    """

    def __init__(self, files: dict[str, dict[str, str]], metrics: list[MetricSpec], tokenizer: Any, batch_size: int, seed: int):
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seed = seed
        self._folder = tempfile.TemporaryDirectory(prefix="qlora-sweep-lm-eval-")
        self.tasks: dict[str, dict[str, Any]] = {}
        for metric in metrics:
            name = metric.metric_name
            if name not in files:
                raise ValueError(f"eval metric {name}: the job carries no lm_eval files for it (build the job with sweeps.plan.eval_job)")
            tasks_folder = write_files(files[name], Path(self._folder.name) / name)
            try:
                self.tasks[name] = load_tasks(metric, tasks_folder, seed)
            except LmEvalProblem as exc:
                raise ValueError(f"eval metric {name}.{exc.field}: {exc}") from None

    def measure(self, model: Any, metric: MetricSpec, on_batch: Callable[[], None] | None = None) -> dict[str, float]:
        """`metric` for `model` (the live peft model, in eval mode under no_grad): the mean over its
        tasks under its name, and each task's value under `<name>_<task>`."""
        from lm_eval.evaluator import evaluate

        name, tasks = metric.metric_name, self.tasks[metric.metric_name]
        with _quiet():
            lm = _trial_lm_class()(pretrained=model, tokenizer=self.tokenizer, batch_size=self.batch_size)
            lm.beat = on_batch
            with seeded(self.seed, lm.device):
                result = evaluate(
                    lm=lm, task_dict={"tasks": tasks}, limit=metric.limit, bootstrap_iters=0, log_samples=False
                )
        if result is None:
            raise ValueError(f"eval metric {name}: lm-eval returned no results (not rank 0?)")
        values = {task: result_value(result["results"], task, metric.lm_eval_metric) for task in tasks}
        if on_batch is not None:
            for _ in tasks:
                on_batch()
        out = {name: sum(values.values()) / len(values)}
        out.update({f"{name}_{task_column(task)}": value for task, value in values.items()})
        return out
