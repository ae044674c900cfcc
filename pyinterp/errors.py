"""The exceptions pyinterp raises for problems a user can fix; messages are one line."""


class PyinterpError(Exception):
    """A model, input or intervention pyinterp cannot use."""


class InputError(PyinterpError):
    """A bad argument: unknown tensor name, index out of range, vector of the wrong size, prompt too long."""


class NativeLibraryError(PyinterpError, ImportError):
    """pyinterp's native libraries or ggml's backends could not be loaded in this process."""
