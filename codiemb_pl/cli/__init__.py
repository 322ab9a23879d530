"""The `codiemb` command line: `main` (console entry, lazy command dispatch: `cli.main`), the LightningCLI
subclass (`lightning`), the fit API (`fit`), config error messages, held start-up logs, run folders and predict
output.

Importing this package imports nothing: `cli.main` is the top of the house (it dispatches to `commands`),
while the other modules here sit beneath `sweeps` and `commands`, which use them.
"""
