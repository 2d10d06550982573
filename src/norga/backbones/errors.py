"""The one error type of the backbone loaders."""


class BackboneLoadError(ValueError):
    """A backbone or checkpoint file that cannot be built or loaded exactly; the message names the file,
    the problem and what to do."""
