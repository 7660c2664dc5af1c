"""kluster.ai as a batch engine of Airflow's common.ai provider (``pip install airflow-provider-kluster[common-ai]``).

The adapter lives in :mod:`airflow_provider_kluster.common_ai.adapter` and is registered through the
``airflow.providers.common.ai.batch_adapters`` entry point under the ``kluster`` prefix. Nothing else in the
package imports it, so the package works without common.ai installed.
"""

from __future__ import annotations
