"""Reading the input: an ``.h5ad`` file into memory or opened for streaming, or the cached demo."""
from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad

from ..errors import InputError
from ..settings import DataSettings, existing_file
from .backed import H5adFile
from .demo import demo_path

log = logging.getLogger(__name__)


def _read(path: str | Path, reader):
    path = existing_file(path)
    try:
        return reader(path)
    except InputError:
        raise
    except Exception as exc:  # h5py/anndata raise many types for a file that is not an h5ad
        raise InputError(f"data.path: cannot read {path} as an .h5ad file ({type(exc).__name__}: {exc}).") from exc


def read_h5ad(path: str | Path) -> ad.AnnData:
    """Read an ``.h5ad`` file into memory, with an error that names the path when it cannot be."""
    return _read(path, ad.read_h5ad)


def open_h5ad(path: str | Path) -> H5adFile:
    """Open an ``.h5ad`` file for streaming (``data.backed=true``): annotations in memory,
    the matrix on disk; errors name the path."""
    return _read(path, H5adFile)


def load_input(data: DataSettings) -> ad.AnnData | H5adFile:
    """The input of a run: ``data.path`` (opened for streaming with ``data.backed``), or the
    cached demo simulated from ``data.simulation`` (``data=demo``)."""
    read = open_h5ad if data.backed else read_h5ad
    if data.source == "anndata":
        raise InputError("data.source=anndata: the AnnData is given by the Python API (deltanmf.fit_twostage); "
                         "on the command line use data=h5ad data.path=...")
    if data.source == "file":
        return read(data.path)
    try:
        path = demo_path(data.simulation, data.cache_dir)
    except (TypeError, ValueError) as err:
        raise InputError(f"data.simulation: {err}") from err
    try:
        return read(path)
    except InputError:  # a damaged cache file (e.g. a copy cut short): simulate it again
        log.warning("the cached demo %s cannot be read; simulating it again", path)
        path.unlink(missing_ok=True)
        return read(demo_path(data.simulation, data.cache_dir))
