"""The "kluster.ai batch" extra link shown on tasks that own or read a batch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperatorLink
from airflow.sdk.execution_time.xcom import XCom

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator, Context
    from airflow.sdk.types import TaskInstanceKey


def batch_url(platform_url: str, batch_id: str) -> str:
    """Return the platform page of a batch (the base comes from the connection extra ``platform_url``)."""
    return f"{platform_url.rstrip('/')}/batches/{batch_id}"


class KlusterBatchLink(BaseOperatorLink):
    """Link a task to its batch's page on the kluster.ai platform."""

    name = "kluster.ai batch"

    @classmethod
    def persist(cls, context: Context, url: str) -> None:
        """Store the link for this task instance (XCom), where the UI looks for it."""
        context["ti"].xcom_push(key=cls().xcom_key, value=url)

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> Any:
        """Return the stored link, or an empty string before the task stored one."""
        return XCom.get_value(key=self.xcom_key, ti_key=ti_key) or ""
