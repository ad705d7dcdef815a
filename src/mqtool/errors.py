"""The one exception type users see: the CLI prints its message on one line and exits non-zero."""


class MqtoolError(Exception):
    """A problem with the user's input or environment (bad path, bad config, unknown task, ...)."""
