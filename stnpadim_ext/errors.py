"""The one error type for bad user input: the CLI prints its message as one line."""


class InputError(ValueError):
    """A file, folder, tensor or model the user gave us is missing, malformed or unusable."""


class WeakSTNError(InputError):
    """train_stn's check failed: the STN aligns held-out views no better than not warping
    (after its retries). The message gives the numbers; the CLI exits 2 with it."""
