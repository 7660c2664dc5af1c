"""Every exception the provider raises. Messages name the batch or file and never carry the API key."""

from __future__ import annotations

try:  # Airflow 3.3 deprecates the airflow.exceptions names (a warning on every import of ours)
    from airflow.sdk.exceptions import AirflowException, AirflowFailException
except ImportError:  # pragma: no cover - Airflow releases without them in the Task SDK
    from airflow.exceptions import AirflowException, AirflowFailException  # type: ignore[no-redef,unused-ignore]

#: HTTP statuses after which the same call may succeed later; besides these, every 5xx and no status at all
#: (the connection failed) are transient.
TRANSIENT_STATUS_CODES = frozenset({408, 409, 429})


def is_transient_status(status_code: int | None) -> bool:
    """Tell whether a call that failed with this HTTP status (``None``: no answer) may succeed if tried later."""
    return status_code is None or status_code in TRANSIENT_STATUS_CODES or status_code >= 500


class KlusterError(AirflowException):
    """Base class of every kluster.ai provider error."""


class KlusterConfigError(KlusterError):
    """A connection or parameter is missing or invalid; nothing was sent to kluster.ai."""


class KlusterAPIError(KlusterError):
    """A call to the kluster.ai API failed; carries the call, the resource id, HTTP status and request id."""

    # AirflowException declares ``status_code`` as the HTTPStatus the API server answers with; here it is the
    # HTTP status kluster.ai answered (``None``: no answer), public since the first release.
    status_code: int | None  # type: ignore[assignment]

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
        return is_transient_status(self.status_code)


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


class KlusterBudgetError(KlusterError):
    """A batch would cost more than ``max_cost`` (what was already ``spent`` included), or its cost cannot be
    checked because a model has no price; nothing was submitted. Amounts are in USD."""

    def __init__(
        self,
        message: str,
        *,
        estimate_usd: float,
        max_cost: float,
        spent: float = 0.0,
        unpriced_models: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.estimate_usd = estimate_usd
        self.max_cost = max_cost
        self.spent = spent
        self.unpriced_models = list(unpriced_models or [])


class KlusterInputChangedError(KlusterError):
    """An earlier try of this task made its batch from other input, and ``on_changed_input="fail"``."""


class KlusterBatchNotFinishedError(KlusterError):
    """The batch is still running (or still cancelling) where the task needed it finished."""

    def __init__(self, message: str, *, batch_id: str, status: str) -> None:
        super().__init__(message)
        self.batch_id = batch_id
        self.status = status


class KlusterWaitError(KlusterError):
    """The wait for a batch broke off before the batch ended: polling failed for good (a rejected key, a batch
    that is gone, or too many transient failures in a row). The batch itself may still be running."""

    def __init__(self, message: str, *, batch_id: str, status: str | None = None) -> None:
        super().__init__(message)
        self.batch_id = batch_id
        self.status = status


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


class KlusterJobTimeoutError(KlusterBatchTimeoutError, AirflowFailException):
    """A whole job passed its ``timeout``: its running batches were cancelled. Not retried by Airflow: a retry would
    find the deadline passed as well (it counts from the job's first batch) and could only resubmit past it."""
