"""The `distrib` command line: launch, test, config, env.

Import cost matters here: the modules that `distrib --help` and `distrib launch` load before the workers
start import only click, yaml, the standard library and distrib's torch-free modules (`_settings`,
`_options`, `_validation`, `_environment`). torch is imported by the executor, when it is needed.
"""
