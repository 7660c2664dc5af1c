"""TaskFlow decorators of the kluster.ai provider (``@task.kluster_batch``), registered through provider info."""
