"""The launch pipeline, apart from any command-line parsing.

options table (`options.py`) + config file (`config_file.py`, `accelerate_compat.py`) -> a pure
`LaunchPlan` (`plan.py`, facts from `machine.py`) -> an executor (`executor.py`: torch's elastic agent, or
`torch_xla.launch`) that starts `worker.py` in every process -> on failure, one report (`failures.py`).
`notebook.py` drives the same pipeline from Python (`notebook_launcher`), and `sanity.py` is the script
`distrib test` launches. The click commands in `distrib/_cli` only parse flags and call into this package;
nothing here imports click (`options.py` aside, whose table types come from the settings).
"""
