"""The one exception tree of fedlearn.

Every error a user can cause is a :class:`FedlearnError` whose message is one
sentence saying what was wrong and what to do about it. The CLI prints that
sentence (no traceback) and exits with the error's ``exit_code``; the HTTP
server answers with the error's ``http_status`` and the same sentence.

- :class:`ConfigError`          a bad flag, config key or value (exit 2, HTTP 422)
- :class:`DatasetError`         a dataset problem (exit 3)
  - :class:`DatasetNotFoundError` no local copy and no way to download it
  - :class:`DatasetCorruptError`  a truncated, corrupt or mis-typed file
- :class:`PartitionError`       an impossible partition request (exit 2)
- :class:`ModelError`           unknown model, or one that does not fit the data (exit 2)
- :class:`PayloadError`         a malformed, wrong-shaped, non-finite or oversize
                                update or weights payload (HTTP 400, or 413 when too big)
- :class:`AuthError`            missing or wrong token or credential (HTTP 401)
- :class:`UnknownClientError`   a client id the server never registered (HTTP 404)
- :class:`RateLimitedError`     too many registrations from one address (HTTP 429)
- :class:`ConflictError`        an update for a closed round, from a client that was
                                not sampled, or too stale (HTTP 409)
- :class:`RunStateError`        a run directory that cannot be written or resumed (exit 4)
- :class:`RemoteError`          the server could not be reached or refused us (exit 5)
- :class:`BackendError`         the Ray cluster cannot be reached or lost the workers
                                of a round for good (exit 6)
- :class:`SecAggAbortedError`   a secure aggregation round cannot finish: fewer clients
                                than its threshold are left, so nothing is revealed (HTTP 409)
"""

from __future__ import annotations


class FedlearnError(Exception):
    """Base class: a user-facing problem with a one-sentence explanation."""

    exit_code: int = 1
    http_status: int = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(FedlearnError):
    """A flag, config file key or value is invalid."""

    exit_code = 2
    http_status = 422


class DatasetError(FedlearnError):
    """A dataset could not be loaded."""

    exit_code = 3


class DatasetNotFoundError(DatasetError):
    """No local copy of a dataset and no way to download it."""


class DatasetCorruptError(DatasetError):
    """A dataset file is truncated, corrupt or not in the expected format."""


class PartitionError(FedlearnError):
    """A partition of the data among clients cannot be made as asked."""

    exit_code = 2
    http_status = 422


class ModelError(FedlearnError):
    """A model name is unknown or the model does not fit the dataset."""

    exit_code = 2
    http_status = 422


class PayloadError(FedlearnError):
    """A weights or update payload is malformed and was refused."""

    http_status = 400


class PayloadTooLargeError(PayloadError):
    """A payload is larger than the configured limit."""

    http_status = 413


class AuthError(FedlearnError):
    """A request carried no valid token or client credential."""

    http_status = 401
    exit_code = 5


class UnknownClientError(FedlearnError):
    """A request named a client id the server does not know."""

    http_status = 404


class RateLimitedError(FedlearnError):
    """Too many requests of one kind from one address (HTTP 429); retry shortly."""

    http_status = 429


class ConflictError(FedlearnError):
    """An update does not belong to the current round or version."""

    http_status = 409


class RunStateError(FedlearnError):
    """A run directory cannot be written, read or resumed."""

    exit_code = 4
    http_status = 500


class RemoteError(FedlearnError):
    """The server could not be reached, or answered with an error."""

    exit_code = 5


class BackendError(FedlearnError):
    """A simulation backend (Ray) cannot be reached or cannot finish a round."""

    exit_code = 6
    http_status = 500


class SecAggAbortedError(FedlearnError):
    """A secure aggregation round has fewer surviving clients than its threshold."""

    http_status = 409
