"""Every exception the provider raises. Messages name the batch or file and never carry the API key."""

from __future__ import annotations

from airflow.exceptions import AirflowException


class KlusterError(AirflowException):
    """Base class of every kluster.ai provider error."""


class KlusterConfigError(KlusterError):
    """A connection or parameter is missing or invalid; nothing was sent to kluster.ai."""


class KlusterAPIError(KlusterError):
    """A call to the kluster.ai API failed; carries the call, the resource id, HTTP status and request id."""

    def __init__(
        self,
        message: str,
        *,
        call: str,
        resource_id: str | None = None,
        status_code: int | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.call = call
        self.resource_id = resource_id
        self.status_code = status_code
        self.request_id = request_id

    @property
    def is_transient(self) -> bool:
        """Tell whether trying the same call again later may succeed (connection, 408, 409, 429, 5xx)."""
        return self.status_code is None or self.status_code in (408, 409, 429) or self.status_code >= 500


class KlusterAuthError(KlusterAPIError):
    """kluster.ai rejected the API key (401) or refused access (403)."""


class KlusterNotFoundError(KlusterAPIError):
    """The batch or file does not exist for this API key (404)."""


class KlusterBadRequestError(KlusterAPIError):
    """kluster.ai rejected the request as invalid (400 or 422)."""


class KlusterTransientAPIError(KlusterAPIError):
    """A connection failure, timeout, 408, 409, 429 or 5xx persisted through every retry."""


class KlusterRequestFileError(KlusterError):
    """A request file or request list is invalid; nothing was uploaded. ``errors`` lists each problem by line."""

    def __init__(self, message: str, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.errors = list(errors or [])


class KlusterBatchError(KlusterError):
    """A batch ended without completing; carries the batch id, its status and kluster's errors."""

    def __init__(self, message: str, *, batch_id: str, status: str, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.batch_id = batch_id
        self.status = status
        self.errors = list(errors or [])


class KlusterBatchFailedError(KlusterBatchError):
    """The batch ended ``failed``: kluster rejected its input or could not run it."""


class KlusterBatchExpiredError(KlusterBatchError):
    """The batch ended ``expired``: its completion window passed before every request ran."""


class KlusterBatchCancelledError(KlusterBatchError):
    """The batch ended ``cancelled`` (by a user, on-call, or this provider on kill or timeout)."""


class KlusterBatchTimeoutError(KlusterBatchError):
    """The wait passed its deadline before the batch finished; the batch was cancelled."""


class KlusterTooManyFailuresError(KlusterBatchError):
    """The batch completed, but more of its requests failed than ``max_failed_ratio`` allows."""
