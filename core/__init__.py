"""The shared vocabulary at the bottom of qlora-sweep: what every layer may import.

Layers point one way: ``core`` <- ``trainables`` <- ``analysis`` <- ``sweeps``
(tests/test_layers.py enforces it). Nothing here imports the other three packages.

* `core.errors`            the user-facing error base class the CLI renders (exit status 2)
* `core.status`            the trial-status enum
* `core.numbers`           "is this a finite number"
* `core.storage`           local folders and s3:// / gs:// URIs through pyarrow filesystems
* `core.redact`            credentials inside URLs masked: the one rule every writer applies
* `core.experiment_folder` the experiment folder's format: file names, readers of Tune's files
* `core.provenance`        package versions, git commit, Python and GPUs behind an experiment
"""
