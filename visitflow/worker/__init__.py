"""The ``visitflow`` Prefect worker type (internal; runs in the worker process).

``prefect worker start --pool P --type visitflow`` finds :class:`VisitflowWorker` through the
``prefect.collections`` entry point, which imports this package: so this file only names the
worker.  :mod:`.worker` is the worker, :mod:`.parent` its zygote and process starter,
:mod:`.zygote` the code that runs in the pre-imported parent, :mod:`.prefect_compat` every
private Prefect name they need.
"""

from .worker import VisitflowWorker

__all__ = ["VisitflowWorker"]
