"""The `distrib` command: `launch`, `test`, `config`, `env`. Entry point of the console script."""

from __future__ import annotations

import click

from .._version import __version__
from .config_cmd import config
from .env_cmd import env
from .launch_cmd import launch, test


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="distrib")
def cli() -> None:
    """distrib: run your PyTorch training loop on many processes, GPUs and machines.

    \b
    distrib config               answer a few questions, write the default config file
    distrib launch train.py      run train.py with that config (flags override it)
    distrib test                 check that this setup works
    distrib env                  print what a bug report needs
    """


cli.add_command(launch)
cli.add_command(test)
cli.add_command(config)
cli.add_command(env)


def main() -> None:
    cli(prog_name="distrib")


if __name__ == "__main__":
    main()
