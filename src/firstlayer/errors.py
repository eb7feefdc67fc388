"""The one exception type for user errors: the CLI prints its message as one line."""


class FirstLayerError(ValueError):
    """A problem with the user's input, stated with its fix ("... : do X")."""
