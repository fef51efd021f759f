"""User-facing errors."""


class SurgeryError(Exception):
    """Bad input: the message is one line that names what is wrong and how to fix it. The CLI exits with code 2."""
