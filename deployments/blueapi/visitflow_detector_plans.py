"""A beamline plan with an area detector that writes its own HDF5 file, wired to ``saxs_average``.

blueapi loads this module through its config (``env.sources``, ``kind: planFunctions``), beside
visitflow_example_plans.py.  It needs ``h5py`` in blueapi's environment (.ci/install-blueapi;
docs/blueapi.md §1): ophyd-async's HDF5 writers import it and blueapi does not depend on it.

The detector is ophyd-async's simulated blob detector (``ophyd_async.sim``: a
``StandardDetector`` whose pattern generator keeps an HDF5 file open in SWMR mode and flushes
each frame), so the RunEngine emits what a real area detector's run emits: one
``StreamResource`` naming the file and a ``StreamDatum`` per frame.  blueapi's own TiledWriter
registers the file in Tiled as an external data source and grows its shape frame by frame;
nothing of the frames travels in the documents.

Two things differ from ``SimBlobDetector`` as shipped, on purpose:

* **frame size and type**: the shipped data logic writes 320x240 uint8 frames, too small to
  matter for an analysis reading a file live; :class:`FrameDataLogic` writes ``height`` x
  ``width`` uint32 frames (the default 1024x1024 is an EIGER/Pilatus-sized frame) with Poisson
  counts around the sim's Gaussian blob, so every frame differs.  It reuses the sim's trigger
  and acquire logics (the same frame timing), so only the file's layout is ours.
* **where the file goes**: blueapi's own ``StartDocumentPathProvider`` takes the directory
  from numtracker (``data_session_directory`` in the start document), which this stack has
  not got.  :class:`VisitPathProvider` takes it from the start document's
  ``instrument`` and ``instrument_session`` through a facility template,
  ``$VISITFLOW_DATA_DIR`` (e.g. ``/dls/{instrument}/data/2026/{visit}``) — the same directory
  Tiled's ``--file-root raw=...`` confines the run's files to (visitflow/tiled/file_roots.py).
  The plan's ``directory`` parameter overrides it: a file written anywhere else is what
  file-root confinement refuses to register.

Written against ophyd-async 0.21.3 (the version blueapi 1.21.1 installs): the sim's logic
classes are imported from their private modules, which ophyd-async does not re-export.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import h5py
import numpy as np
from bluesky.utils import MsgGenerator
from ophyd_async.core import (
    DetectorDataLogic,
    PathInfo,
    PathProvider,
    StandardDetector,
    StreamableDataProvider,
    StreamResourceDataProvider,
    StreamResourceInfo,
    TriggerInfo,
)
from ophyd_async.plan_stubs import ensure_connected
from ophyd_async.sim import PatternGenerator
from ophyd_async.sim._blob_acquire_logic import BlobAcquireLogic
from ophyd_async.sim._blob_trigger_logic import BlobTriggerLogic
from ophyd_async.sim._pattern_generator import DATA_PATH, generate_gaussian_blob

from visitflow.trigger import uses_analyses

DATA_DIR_ENV = "VISITFLOW_DATA_DIR"
#: The frames' dtype; its data key in the run is the detector's name, ``saxs``.
DTYPE = np.dtype("<u4")
#: Each frame's wall-clock write time (POSIX s), where areaDetector's HDF5 plug-in keeps it; not
#: announced to Tiled (benchmarks/blueapi_hdf5_lag.py reads it to time frame -> result).
TIMESTAMPS_PATH = "/entry/instrument/NDAttributes/NDArrayTimeStamp"


class VisitPathProvider(PathProvider):
    """The visit's data directory from the current start document (blueapi puts
    ``instrument`` and ``instrument_session`` into every run's metadata)."""

    def __init__(self, template: str, directory: str | None = None):
        self.template, self.directory, self.start = template, directory, None

    def run_start(self, name: str, doc: dict) -> None:
        self.start = doc

    def __call__(self, device_name: str | None = None) -> PathInfo:
        if self.start is None:
            raise RuntimeError("no start document yet: the detector's file is named inside a run")
        directory = Path(self.directory or self.template.format(
            instrument=self.start.get("instrument", ""), visit=self.start["instrument_session"]))
        return PathInfo(directory_path=directory, filename=f"{device_name}-{self.start['uid'][:8]}")


class FrameFile:
    """The detector's HDF5 file: ``/entry/data/data`` grows by one chunk-sized frame at a time,
    flushed, with the file in SWMR mode (so Tiled can read it while it grows); each frame's
    write time goes to :data:`TIMESTAMPS_PATH`."""

    def __init__(self, path: Path, height: int, width: int, seed: int):
        self.file = h5py.File(path, "w", libver="latest")
        self.data = self.file.create_dataset(DATA_PATH, shape=(0, height, width), dtype=DTYPE,
                                             maxshape=(None, height, width), chunks=(1, height, width))
        self.times = self.file.create_dataset(TIMESTAMPS_PATH, shape=(0,), dtype="<f8", maxshape=(None,),
                                              chunks=(1024,))
        self.file.swmr_mode = True
        self.blob = generate_gaussian_blob(height, width) * 1000.0
        self.rng = np.random.default_rng(seed)
        self.image_counter = 0

    def write_image_to_file(self, intensity: float) -> None:
        frame = self.rng.poisson(self.blob * (0.5 + intensity)).astype(DTYPE)
        self.data.resize(self.image_counter + 1, axis=0)
        self.data[self.image_counter] = frame
        self.data.flush()
        self.times.resize(self.image_counter + 1, axis=0)
        self.times[self.image_counter] = time.time()
        self.times.flush()
        self.image_counter += 1

    def close(self) -> None:
        self.file.close()


class FramePatternGenerator(PatternGenerator):
    """The sim's generator (frame timing, ``images_written``), writing :class:`FrameFile`\\ s."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = seed

    def open_file(self, path, width: int, height: int):
        self._file = FrameFile(Path(path), height, width, self.seed)
        self._update_images_written(0)


class FrameDataLogic(DetectorDataLogic):
    """Opens the file where the path provider says and announces its one dataset."""

    def __init__(self, path_provider: PathProvider, generator: FramePatternGenerator, height: int, width: int):
        self.path_provider, self.generator, self.shape = path_provider, generator, (height, width)

    async def prepare_unbounded(self, datakey_name: str) -> StreamableDataProvider:
        info = self.path_provider(datakey_name)
        self.generator.open_file(info.directory_path / f"{info.filename}.h5", self.shape[1], self.shape[0])
        return StreamResourceDataProvider(
            uri=f"{info.directory_uri}{info.filename}.h5",
            resources=[StreamResourceInfo(data_key=datakey_name, shape=self.shape, chunk_shape=(1, *self.shape),
                                          dtype_numpy=DTYPE.str, parameters={"dataset": DATA_PATH})],
            mimetype="application/x-hdf5",
            collections_written_signal=self.generator.images_written)

    async def stop(self) -> None:
        self.generator.close_file()

    def get_hinted_fields(self, datakey_name: str):
        return [datakey_name]


class SaxsDetector(StandardDetector):
    """ophyd-async's sim blob detector with :class:`FrameDataLogic` for its data."""

    def __init__(self, path_provider: PathProvider, height: int, width: int, seed: int = 0, name: str = "saxs"):
        self.pattern_generator = FramePatternGenerator(seed)
        self.add_detector_logics(BlobTriggerLogic(pattern_generator=self.pattern_generator),
                                 BlobAcquireLogic(pattern_generator=self.pattern_generator),
                                 FrameDataLogic(path_provider, self.pattern_generator, height, width))
        super().__init__(name=name)


@uses_analyses("saxs_average")
def saxs_detector_scan(frames: int = 100, height: int = 1024, width: int = 1024, exposure: float = 0.05,
                       seed: int = 0, directory: str | None = None) -> MsgGenerator:
    """``frames`` exposures of the SAXS area detector, one event each; the detector writes them
    to an HDF5 file in the visit's data directory (``directory`` overrides it); the runs start
    the saxs_average analysis.  Returns the run's uid."""
    template = os.environ.get(DATA_DIR_ENV)
    if not template and not directory:
        raise RuntimeError(f"${DATA_DIR_ENV} is not set: the facility's visit directory template")
    provider = VisitPathProvider(template or "", directory)
    det = SaxsDetector(provider, height, width, seed)
    yield from ensure_connected(det)
    token = yield from bps.subscribe("start", provider.run_start)

    def scan():
        uid = yield from bps.open_run()   # (the RunEngine closes it as failed if the plan raises)
        yield from bps.prepare(det, TriggerInfo(livetime=exposure), wait=True)
        for _ in range(frames):
            yield from bps.trigger_and_read([det])
        yield from bps.close_run()
        return uid

    return (yield from bpp.finalize_wrapper(bpp.stage_wrapper(scan(), [det]), bps.unsubscribe(token)))


__all__ = ["DATA_DIR_ENV", "TIMESTAMPS_PATH", "FrameDataLogic", "FrameFile", "SaxsDetector", "VisitPathProvider",
           "saxs_detector_scan"]
