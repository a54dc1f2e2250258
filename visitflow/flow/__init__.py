"""Internal: what runs inside a flow run (and the analyst's tools that run the same code).

``@analysis`` and the Prefect flow it builds (:mod:`.builder`), the analysis spec
(:mod:`.spec`), the live/post engine (:mod:`.engine`), the credentials Block
(:mod:`.credentials`) and delegation (:mod:`.delegation`), Tiled as a raw source
(:mod:`.source`), by push (:mod:`.push`) and as a result sink (:mod:`.sink`), and the
server-free checks (:mod:`.testing`, :mod:`.check`, :mod:`.scaffold`).  No stability
promise: the public faces are ``visitflow.analysis``, ``visitflow.read_result``,
``visitflow.blocks`` and ``visitflow.testing``.
"""

__all__ = []
