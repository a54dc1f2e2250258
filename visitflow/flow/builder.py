"""``@analysis``, and the Prefect flow every analysis becomes: credentials → raw source → engine → results.

One flow per analysis, taking ``visit`` and ``run_id`` and, if the analysis declares
options (:mod:`visitflow.core.options`), one keyword parameter per option; the variant (``live`` or
``post``) comes from the deployment name, so the trigger's parameters stay ``{visit,
run_id, **options}``.  Tuning comes from the environment (deployment job variables), never from
parameters: ``VISITFLOW_CREDENTIALS_BLOCK`` (default ``visitflow``),
``VISITFLOW_LIVE_POLL_INTERVAL``, ``VISITFLOW_LIVE_IDLE_TIMEOUT``,
``VISITFLOW_POST_WAIT_TIMEOUT``; ``VISITFLOW_LIVE_PUSH=0`` makes live poll only (it follows
the run by Tiled's websocket stream by default, polling as fallback: :mod:`.push`).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import importlib.metadata
import inspect
import io
import logging
import os
import subprocess
import time
from pathlib import Path

import numpy as np
from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.concurrency.sync import concurrency

from . import engine
from . import metrics as flow_metrics
from ..core import endpoints, names as grants
from ..errors import Superseded, UsageError
from ..core.options import docstring_args, flow_parameters

from .spec import AnalysisSpec, declare

__all__ = [
    'analysis', 'DEFAULT_BLOCK', 'live_settings', 'post_settings', 'live_source', 'code_version',
    'variant_from_deployment', 'result_markdown', 'make_flow',
]

DEFAULT_BLOCK = endpoints.DEFAULT_BLOCK


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def live_settings() -> engine.LiveSettings:
    return engine.LiveSettings(
        poll_interval=_env_float("VISITFLOW_LIVE_POLL_INTERVAL", 0.2),
        max_poll_interval=_env_float("VISITFLOW_LIVE_MAX_POLL_INTERVAL", 2.0),
        idle_timeout=_env_float("VISITFLOW_LIVE_IDLE_TIMEOUT", 600.0),
        max_batch=int(_env_float("VISITFLOW_LIVE_MAX_BATCH", 256)),
        write_pacing=_env_float("VISITFLOW_LIVE_WRITE_PACING", 1.0),
        pace_above=_env_float("VISITFLOW_LIVE_PACE_ABOVE", 0.5),
    )


def post_settings() -> engine.PostSettings:
    return engine.PostSettings(wait_timeout=_env_float("VISITFLOW_POST_WAIT_TIMEOUT", 3600.0))


@contextlib.contextmanager
def live_source(poll, access):
    """The live variant's source: push (websocket) over ``poll``, unless turned off."""
    if os.environ.get("VISITFLOW_LIVE_PUSH", "1") in ("0", "false", "no"):
        yield poll
        return
    from .push import PushRawRun

    push = PushRawRun(poll, lambda: access.tokens()[0],
                      reconcile_interval=_env_float("VISITFLOW_LIVE_RECONCILE_INTERVAL", 5.0))
    try:
        yield push
    finally:
        push.close()
        logging.getLogger("visitflow.stream").info("live source: %s", push.stats())


@functools.lru_cache(maxsize=None)
def code_version(path: str) -> str:
    """git sha of the checkout holding the flow (dirty-marked), else the package version."""
    try:
        cwd = Path(path).resolve().parent
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=cwd, capture_output=True,
                               text=True, timeout=5).stdout.strip()
        return f"git:{sha}{'+dirty' if dirty else ''}"
    except Exception:  # noqa: BLE001 - not a git checkout (an image): fall back
        return f"visitflow=={_package_version()}"


def _package_version() -> str:
    # From the installed distribution, not ``visitflow.__version__``: importing the package
    # here would close the loop visitflow -> spec -> flowrun -> visitflow.
    try:
        return importlib.metadata.version("visitflow")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def variant_from_deployment(explicit: str | None) -> str:
    if explicit:
        return explicit
    name = runtime.deployment.name or ""
    return name if name in ("live", "post") else "post"


def _png_data_uri(image: np.ndarray, side: int = 256) -> str | None:
    """A 2-D output as a PNG data URI about ``side`` pixels on its long edge.

    The Prefect UI shows markdown images at their native size, so a 64×64 detector
    average would be a thumbnail: small images are enlarged by an integer factor (nearest
    neighbour, so pixels stay honest), large ones subsampled.  Contrast is the 1–99th
    percentile, robust to hot pixels."""
    try:
        from PIL import Image
    except ImportError:
        return None
    img = np.asarray(image, dtype=float)
    if img.ndim != 2 or not img.size or not np.isfinite(img).any():
        return None
    step = max(1, int(np.ceil(max(img.shape) / side)))
    img = img[::step, ::step]
    lo, hi = np.nanpercentile(img, [1, 99])
    scaled = np.nan_to_num(np.clip((img - lo) / ((hi - lo) or 1), 0, 1))
    pil = Image.fromarray((scaled * 255).astype(np.uint8))
    zoom = side // max(img.shape)
    if zoom > 1:
        pil = pil.resize((img.shape[1] * zoom, img.shape[0] * zoom), Image.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _fmt(value) -> str:
    value = np.asarray(value).item()
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def result_markdown(spec: AnalysisSpec, outputs: dict, *, visit: str, run_id: str, variant: str,
                    frames: int, result_uri: str) -> str:
    """The result artifact: scalars as a name/value table, arrays as a statistics table,
    and each 2-D array as an image (what staff see in the Prefect UI without Tiled)."""
    lines = [f"# {spec.name} ({variant}) — visit {visit}, run {run_id[:8]}", "",
             f"{frames} frames processed. Result in Tiled: `{result_uri}`", ""]
    scalars = {k: v for k, v in outputs.items() if np.ndim(v) == 0}
    arrays = {k: np.asarray(v) for k, v in outputs.items() if np.ndim(v) > 0}
    if scalars:
        lines += ["| output | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in scalars.items()] + [""]
    images = []
    if arrays:
        lines += ["| array | shape | dtype | min | mean | max |", "|---|---|---|---|---|---|"]
        for key, arr in arrays.items():
            stats = (f"{np.nanmin(arr):.4g} | {np.nanmean(arr):.4g} | {np.nanmax(arr):.4g}"
                     if arr.size and arr.dtype.kind in "fiu" else " | | ")
            lines.append(f"| {key} | {arr.shape} | {arr.dtype} | {stats} |")
            if arr.ndim == 2:
                uri = _png_data_uri(arr)
                if uri:
                    images.append(f"### {key}\n\n![{key}]({uri})")
    return "\n".join(lines + [""] + images)


def make_flow(spec: AnalysisSpec, **flow_kwargs):
    """Build the Prefect flow for ``spec`` (called by ``@analysis``)."""

    def run_name() -> str:
        params = runtime.flow_run.parameters or {}
        return grants.flow_run_name(spec.name, variant_from_deployment(params.get("variant")),
                                    params.get("visit", "?"), params.get("run_id", "?"))

    def body(visit: str, run_id: str, variant: str | None = None, **options) -> dict:
        from .credentials import ScopedCredentials
        from .sink import TiledResultSink
        from .source import TiledRawRun

        logger = get_run_logger()
        # Library logs (resume, stale results...) reach the Prefect UI through
        # PREFECT_LOGGING_EXTRA_LOGGERS=visitflow; let INFO through.
        logging.getLogger("visitflow").setLevel(logging.INFO)
        variant = variant_from_deployment(variant)
        if variant not in ("live", "post"):
            raise UsageError(f"variant must be 'live' or 'post', not {variant!r}")
        run_spec = spec.with_options(options)  # a bad option fails here, before any data access
        block_name = os.environ.get(endpoints.BLOCK_ENV, DEFAULT_BLOCK)
        creds = ScopedCredentials.load(block_name, _sync=True)
        # The run's beamline rides in a tag (the trigger's ``instrument:<name>``), never a parameter.
        instrument = grants.instrument_from_tags(runtime.flow_run.tags)
        access = creds.for_run(visit, run_id, spec.name, instrument)  # fails here, before any data access
        logger.info("acting for %s via %s on raw %s", access.grant_claims.sub,
                    " <- ".join(access.grant_claims.actor_chain()) or "?", access.raw_path)
        source = TiledRawRun(access.raw_run(), run_spec.reads, run_spec.stream)
        flow_run_id = str(runtime.flow_run.id or "")
        provenance = {
            "analysis": spec.name, "reads": list(spec.reads), "visit": visit, "run_id": run_id,
            "instrument": instrument,
            "raw_uri": source.uri, "flow_run_id": flow_run_id, "flow_run_name": runtime.flow_run.name,
            "deployment": f"{spec.flow_name}/{runtime.deployment.name}" if runtime.deployment.name else None,
            "code_version": code_version(spec.function.__code__.co_filename),
            "options": run_spec.option_values,
            "user": (source.run.metadata.get("start") or {}).get("user"),   # blueapi: the caller's fedid
            **access.token_identity(),
        }
        fence = None
        if variant == "live" and flow_run_id:   # live writes in place: fenced per attempt (flow/attempt.py)
            from ..core.fence import Fence
            from .attempt import current_attempt

            fence = Fence(flow_run_id, current_attempt(flow_run_id))
            provenance["attempt"] = fence.attempt
        sink = TiledResultSink(access.processed_run(), spec.name, variant, provenance, flow_run_id=flow_run_id,
                               fence=fence)
        progress_id = create_progress_artifact(
            0.0, key=f"{spec.flow_name}-{variant}-progress",
            description=f"{spec.name} {variant}: frames processed of frames available")
        last, counted = [0.0], [0]

        def progress(done: int, known: int | None, message: str) -> None:
            flow_metrics.observe_progress(spec.name, variant, counted[0], done, known)  # via the worker's /metrics
            counted[0] = max(counted[0], done)
            if message == "live":
                return   # each live batch: metrics only (no artifact update, no log line)
            now = time.monotonic()
            if message != "running" or now - last[0] >= 1.0:
                last[0] = now
                pct = 100.0 * done / known if known else 0.0
                update_progress_artifact(progress_id, min(pct, 100.0))
                logger.info("%s: %d/%s frames", message, done, known if known is not None else "?")

        t0 = time.monotonic()
        try:
            if variant == "live":
                # At most N live analyses per visit (limit created with the visit; absent = unlimited).
                with concurrency(f"visitflow-live-{visit}", occupy=1, strict=False), \
                        live_source(source, access) as live:
                    outputs = engine.run_live(run_spec, live, sink, live_settings(), progress)
            else:
                outputs = engine.run_post(run_spec, source, sink, post_settings(), progress)
        except Superseded as exc:
            from .attempt import stop_superseded

            stop_superseded(logger, fence, str(exc))
        except Exception as exc:
            if fence is not None:
                from .attempt import stop_superseded, superseded

                if superseded(fence):   # e.g. a timeout while cut off: the later attempt's run now
                    stop_superseded(logger, fence, f"{type(exc).__name__} here: {exc}")
            sink.fail(f"{type(exc).__name__}: {exc}")
            raise
        frames = int(sink.node.metadata.get("frames_processed", 0)) if sink.node is not None else 0
        result_uri = sink.node.uri if sink.node is not None else ""
        create_markdown_artifact(
            result_markdown(spec, outputs, visit=visit, run_id=run_id, variant=variant,
                            frames=frames, result_uri=result_uri),
            key=f"{spec.flow_name}-{variant}-result", description=f"{spec.name} result for {visit}/{run_id[:8]}")
        logger.info("%s %s done: %d frames in %.1fs -> %s (data token refreshed %d times)", spec.name, variant,
                    frames, time.monotonic() - t0, result_uri, getattr(access.tokens, "refreshes", 0))
        return {"frames": frames, "result_uri": result_uri, "outputs": sorted(outputs)}

    body.__name__ = spec.name
    # The options as real, typed keyword parameters (Prefect's parameter schema, UI form and
    # validation all read the signature); ``**options`` receives them.
    sig = inspect.signature(body)
    fixed = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    body.__signature__ = sig.replace(parameters=fixed + flow_parameters(spec.options))
    body.__doc__ = (spec.description or f"visitflow analysis {spec.name}") + docstring_args(spec.options)
    options = dict(name=spec.flow_name, flow_run_name=run_name, description=spec.description or None,
                   validate_parameters=True, persist_result=False, log_prints=True)
    options.update(flow_kwargs)
    prefect_flow = flow(**options)(body)
    prefect_flow.spec = spec  # the analyst's function and incremental form, for tests and tools
    prefect_flow.function = spec.function  # the science function exactly as written (docs/analysts.md)
    return prefect_flow


def analysis(reads: list[str] | tuple[str, ...], *, incremental: type | None = None,
             options: type | None = None, name: str | None = None, stream: str = "primary",
             live_throttle: float = 2.0, flow_kwargs: dict | None = None):
    """Declare an analysis.  Returns a decorator that gives back a Prefect ``Flow``.

    ``reads``: the raw fields the function needs — what post reads, what live polls, and
    what least privilege is checked against.  ``incremental``: an optional class
    (``__init__(**options)``, ``update(**batch)``, ``result()``) for efficient live
    processing.  ``options``: an optional :class:`visitflow.core.options.Options` subclass; each
    of its fields is passed to the function (and the incremental class' ``__init__``) as a
    keyword argument, is a flow parameter, and may be set per plan (:mod:`visitflow.core.options`).

    The returned flow carries ``.spec`` (an :class:`AnalysisSpec`; call it with the fields
    and options to run the science without Prefect or Tiled) and ``.function`` (the plain
    function exactly as written).
    """
    to_spec = declare(reads, incremental=incremental, options=options, name=name, stream=stream,
                      live_throttle=live_throttle)

    def decorate(fn):
        return make_flow(to_spec(fn), **(flow_kwargs or {}))

    return decorate
