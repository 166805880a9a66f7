"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """A mistake in the user's input (arguments, files, data): say what and how to fix it."""
