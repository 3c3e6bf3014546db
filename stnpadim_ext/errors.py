"""The one error type for bad user input: the CLI prints its message as one line."""


class InputError(ValueError):
    """A file, folder, tensor or model the user gave us is missing, malformed or unusable."""
