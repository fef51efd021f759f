"""User-facing errors."""


def first_line(err: BaseException) -> str:
    """An exception's message cut to its first line (library messages run to tables and hints), else its type."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


class SurgeryError(Exception):
    """Bad input: the message is one line that names what is wrong and how to fix it. The CLI exits with code 2."""

    # Raised in one of N launched processes only (its own shard file, say): that process reports it (cli.error_line).
    process_local = False


class RecipeError(SurgeryError):
    """Every problem found in a recipe, one line each (key path, what is wrong, the fix), reported together.

    `partial` is the recipe with the failing keys left at their defaults, so later checks (against the source's
    config, say) can still run and add their problems to the same report; None when no recipe could be built.
    """

    def __init__(self, problems: list[str], partial=None):
        self.problems = list(dict.fromkeys(problems))  # each once, in order
        self.partial = partial
        if len(self.problems) == 1:
            message = f"recipe: {self.problems[0]}"
        else:
            listed = "\n".join(f"  - {p}" for p in self.problems)
            message = f"the recipe has {len(self.problems)} problems:\n{listed}"
        super().__init__(message)
