"""User-facing errors: the CLI prints their message (which names the file or key and the fix) and exits 1."""


class PipelineError(Exception):
    """Bad input or a failed quality gate; the message says what is wrong and what to do."""


class ParamsError(PipelineError, ValueError):
    """A params file that cannot be used; the message names every offending dotted key."""
