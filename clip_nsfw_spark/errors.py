"""Exceptions: one base class, one subclass per kind of problem a user can fix.

Every message says what was expected, what was found, and how to fix it.
"""


class ClipNsfwError(Exception):
    """Base class of every error this package raises on purpose."""


class ModelError(ClipNsfwError):
    """A model could not be found, fetched, verified, converted or loaded."""


class UnknownModelError(ModelError):
    """A model name is neither a registry name nor an existing path."""


class ChecksumError(ModelError):
    """A downloaded or cached model file does not have the pinned sha256."""


class UnsafeArchiveError(ModelError):
    """A model archive holds a member that would land outside its extraction directory."""


class UnsafeModelFileError(ModelError):
    """A model file (a pickled state dict) references code or data a plain tensor file never needs."""


class DimensionError(ClipNsfwError, ValueError):
    """Embeddings do not have the dimension the model expects."""


class ConfigError(ClipNsfwError, ValueError):
    """The job configuration is invalid (unknown key, bad value, conflicting options)."""


class InputError(ClipNsfwError):
    """The input dataset is missing, unreadable, or not of the expected shape."""


class InputChangedError(InputError):
    """An input file does not hold what the plan read from it (it changed after it was planned): the task
    leaves nothing, and the run drops the plan's footers so that a --resume reads the file again."""


class DamagedInputError(InputError):
    """An input file's bytes are damaged (a page CRC mismatch, a page that does not decompress to its
    stated size, a truncated chunk …): permanent, never retried; the task fails and writes nothing."""


class OutputError(ClipNsfwError):
    """The output location cannot be used (not empty, inside the input, not writable)."""


class LeaseLostError(OutputError):
    """This run no longer holds (or may no longer hold) its output's lease: it must not touch the output,
    not even to clean up what it committed a moment ago (those names may be another run's files now)."""


class MissingDependencyError(ClipNsfwError, ImportError):
    """An optional dependency is needed for this feature; the message names the pip command."""


class TaskError(ClipNsfwError):
    """A task failed for a reason that is not a known input problem (I/O, a worker's environment …).

    The message names the task's input file and the cause; the run can be finished with --resume."""


class LeaseUnreadableError(TaskError):
    """The store failed while a task read the run's lease before committing: whether the run still holds it is
    unknown. Retried like any TaskError; files already moved into place are left as they are (as for a lost
    lease: their names may hold another run's files by now)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler stopping the job), raised like Ctrl-C so the run cleans up on its way out."""
