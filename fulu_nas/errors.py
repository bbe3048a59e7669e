"""The one exception type for bad user input."""


class FuluConfigError(ValueError):
    """Bad user input (a malformed search space, an impossible architecture, a missing file, a
    wrong storage URL). Raised early, listing every problem; the CLI prints it and exits 2."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))
