"""The `pairdots` command line (pyproject [project.scripts] points at `main`)."""

from pairdots_server.cli.main import main

__all__ = ["main"]
