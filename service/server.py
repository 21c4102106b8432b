"""`serve(settings)`: run the app under uvicorn (uvloop + httptools), one or N worker processes.

Workers are separate processes that each build their own app from the environment, so the
settings are written into SIDREC_* variables first. With N > 1 workers the Prometheus
multiprocess mode is switched on (see metrics.py): PROMETHEUS_MULTIPROC_DIR is a fresh temporary
folder unless the operator set one, and its old *.db files are removed at start.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import uvicorn

from sidrec.bundle import load_bundle
from sidrec.histories_file import check_histories

from .metrics import MULTIPROC_ENV
from .runtime import check_engine
from .settings import Settings

log = logging.getLogger("sidrec.service")


def settings_to_env(settings: Settings) -> dict[str, str]:
    env = {}
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"SIDREC_{name.upper()}"] = str(value)
    return env


def prepare_multiprocess_metrics() -> Path:
    given = os.environ.get(MULTIPROC_ENV)
    folder = Path(given) if given else Path(tempfile.mkdtemp(prefix="sidrec-metrics-"))
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):  # values of a previous run would be added to ours
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(folder)
    return folder


def serve(settings: Settings | None = None) -> None:
    """Run the service until interrupted. Raises BundleError (naming the file) on a bad bundle
    or one without model.pt for SIDREC_ENGINE=torch, ProviderError when SIDREC_DEVICE=cuda
    (or PyTorch for the torch engine or index) cannot be had, HistoriesFileError (file and
    line) when SIDREC_HISTORIES is not a readable histories file."""
    settings = settings or Settings()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    # Check the bundle and the device once here, so a mistake stops us before any worker starts.
    bundle = load_bundle(settings.bundle)
    check_engine(bundle, settings.engine, settings.device, settings.index)
    if settings.histories is not None:
        check_histories(settings.histories)
    os.environ.update(settings_to_env(settings))
    metrics_dir = None
    if settings.workers > 1:
        metrics_dir = prepare_multiprocess_metrics()
        log.info("%d workers; Prometheus multiprocess files in %s", settings.workers, metrics_dir)
    try:
        uvicorn.run(
            "sidrec.service.app:create_app",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            loop="uvloop",
            http="httptools",
            log_level=settings.log_level,
            access_log=False,
            timeout_graceful_shutdown=10,
        )
    finally:
        if metrics_dir is not None and not os.environ.get("SIDREC_KEEP_METRICS_DIR"):
            shutil.rmtree(metrics_dir, ignore_errors=True)
