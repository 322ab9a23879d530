"""One exception type for bad user input: the CLI prints its message as one line and exits non-zero."""


class InputError(ValueError):
    """Bad user input (data file, config value, checkpoint). The message says where, what and what to do."""

    def __init__(self, where: str, problem: str, fix: str | None = None):
        self.where, self.problem, self.fix = where, problem, fix
        message = f"{where}: {problem}"
        if fix:
            message += f" ({fix})"
        super().__init__(message)
