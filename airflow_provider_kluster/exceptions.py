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
