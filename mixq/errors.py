"""User-facing errors: one line that names the file or tensor and says what to do."""


class MixqError(Exception):
    """An error caused by bad input. The CLI prints `mixq: <message>` and exits 1, no traceback."""


class CheckpointError(MixqError):
    """A checkpoint directory or file is missing, corrupt, or disagrees with its config."""


class FormatError(MixqError):
    """A quantized tensor would be misread by EXL2 kernels (bad dtype, shape, group layout...)."""
