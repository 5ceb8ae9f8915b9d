"""The one base class of every error a user can cause (a config value, a data file, a path, a
busy workdir, a full disk). The CLI prints these as one line, `centermask <cmd>: error: ...`,
with exit code 2; anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """A request that cannot be carried out as given; the message says what to do instead."""


class MissingError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (or is not what the command needs)."""
