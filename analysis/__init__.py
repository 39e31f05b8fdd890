"""Reading and explaining finished (or running) sweeps: `qlora-sweep report`, `compare` and `export`.

Floor plan, bottom up (each module imports only modules earlier in this list, and core/ and trainables/):

    saved_spec     a typed, lenient view of the saved sweep_spec.yaml
    results        the experiment folder (via core.experiment_folder) -> Experiment (the trials table)
    pareto         rankable trials, the Pareto front, the best under each memory budget
    importance     hyperparameter importance from the sweep's Optuna study (or one rebuilt)
    memory_report  predicted vs measured memory, GPU packing, the multi-objective front
    formatting     how values are written (cells, losses, memory with its kind, Markdown tables)
    summary        Analysis: everything the report shows, computed once (summary, provenance, columns)
    plots          the charts (matplotlib, PNG bytes)
    html           report.html
    report         report.md and writing the report folder; compare and export build on these

analysis/ imports nothing from sweeps/ (tests/test_layers.py).
"""
