"""The `codiemb` command line: `main` (console entry, lazy command dispatch), the LightningCLI subclass and
its fit API (`lightning`), config error messages, held start-up logs, run folders and predict output.

Importing this package imports only `main` (nothing heavy), so `codiemb --help` stays fast.
"""

from codiemb_pl.cli.main import console_main, main, register_command

__all__ = ["console_main", "main", "register_command"]
