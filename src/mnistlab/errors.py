"""The one exception type users see: caught at the CLI boundary and printed as one line."""


class MnistlabError(Exception):
    """A problem the user can fix; its message says what was wrong and what to do."""


class DataError(MnistlabError):
    """Missing, corrupt or mismatched dataset files."""


class DownloadError(DataError):
    """No mirror delivered a verified file."""


class Interrupted(MnistlabError):
    """Ctrl-C or SIGTERM stopped a run between two saved epochs."""
