"""The one exception type pyinterp raises for problems a user can fix."""


class PyinterpError(Exception):
    """A model, input or intervention pyinterp cannot use; the message is one line."""
