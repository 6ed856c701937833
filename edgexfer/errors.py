"""User-facing errors. The CLI prints them as one line and exits non-zero, with no traceback."""


class EdgexferError(Exception):
    """A mistake in what the user asked for (bad path, unknown name, unusable data)."""


class DataError(EdgexferError):
    """The data set cannot be used: missing folder, empty class, corrupt image, too few images."""


class BackboneError(EdgexferError):
    """Unknown backbone, or its weights cannot be found or loaded."""


class RunFolderError(EdgexferError):
    """A run folder lacks the artifact a stage needs, or holds a run made with another config."""
