"""Table and artifact I/O shared by the stages: Arrow record-batch reads and writes of
Parquet/CSV (`table_io`) and stage manifests, the commit marker of every output
directory (`artifacts`).
"""

import importlib as _importlib

_EXPORTS = {'ReadTableBlocks': 'table_io', 'WriteTableBlocks': 'table_io'}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    # Lazy, so that importing a pure-numpy kernel module does not import Beam.
    if name in _EXPORTS:
        return getattr(_importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
