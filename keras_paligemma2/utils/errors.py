"""The package's own error for a mistake in what the caller gave."""


class InputError(ValueError):
    """A mistake in what the user gave: a name, a file, an image, a prompt,
    an argument. Every check of the package raises it (a `ValueError`, so
    `except ValueError` catches it too); the command line prints it as one
    line, and shows anything else as a bug, with its traceback."""
