"""The `codiemb` command line: `main` (console entry, lazy command dispatch: `cli.main`), the LightningCLI
subclass and its fit API (`lightning`), config error messages, held start-up logs, run folders and predict
output.

Importing this package imports nothing: `cli.main` is the top of the house (it dispatches to `commands`),
while the other modules here sit beneath `sweeps` and `commands`, which use them.
"""
