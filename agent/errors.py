"""The exception tree.

Three families decide what happens to a message:
- ConfigError: the agent cannot start (exit 78, systemd must not restart it).
- TransientError: infrastructure trouble; the delivery goes back for another try.
- PermanentError: the message itself is bad; it is kept under rejected/ and acknowledged.
An experiment that exits non-zero is none of these: it is a result, reported and acknowledged.
"""


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """A setting is missing, unknown or invalid; the message names the key and the file."""


class TransientError(AgentError):
    """Infrastructure trouble worth another attempt (storage down, disk full, ...)."""


class StorageUnavailable(TransientError):
    """The artifact store could not be reached or refused a transfer."""


class PermanentError(AgentError):
    """Retrying cannot help."""


class BadRequest(PermanentError):
    """The message cannot be parsed or validated as a StudioML request."""


class UnsafeArchive(PermanentError):
    """A tar member would escape its directory or is of a forbidden type."""


class StorageDenied(PermanentError):
    """The store refused the credentials, or the bucket does not exist: retrying cannot help."""


class ArtifactMissing(PermanentError):
    """An immutable (input) artifact does not exist in storage."""


class EnvironmentFailed(PermanentError):
    """The Python environment for an experiment could not be built."""
