"""Let MONAI Label 0.8.5 import beside pydicom 3: ``PYTHONPATH=monailabel_app/compat monailabel start_server ...``.

MONAI Label 0.8.5 imports ``pydicom_seg`` (0.4.1, its last release) at start-up, and ``pydicom_seg`` imports
``pydicom._storage_sopclass_uids``, a private module pydicom 3 removed (the SOP class UIDs moved to
``pydicom.uid``). The bundle needs pydicom 3 (its DICOM reader uses ``pydicom.pixels``), so without this the
server stops with ``ModuleNotFoundError: No module named 'pydicom._storage_sopclass_uids'`` before loading
any app. Python imports ``sitecustomize`` at start-up from ``PYTHONPATH``; this one registers an import hook
that answers only for that module name, with the ``*Storage`` UIDs of ``pydicom.uid``, and only when pydicom
itself does not have the module (pydicom 2). The hook is inherited by MONAI Label's training and batch
subprocesses through the environment. Nothing is imported at start-up.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

ALIAS = "pydicom._storage_sopclass_uids"


class StorageUidAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serve ``pydicom._storage_sopclass_uids`` from ``pydicom.uid`` (appended last, so a real module wins)."""

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        return importlib.machinery.ModuleSpec(fullname, self) if fullname == ALIAS else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        import pydicom.uid

        for name in dir(pydicom.uid):
            if name.endswith("Storage"):
                setattr(module, name, getattr(pydicom.uid, name))


def install() -> None:
    """Append the hook to ``sys.meta_path`` once."""
    if not any(type(finder).__name__ == StorageUidAlias.__name__ for finder in sys.meta_path):
        sys.meta_path.append(StorageUidAlias())


install()
