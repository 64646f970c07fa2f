"""Put the bundle root on sys.path so tests import `scripts.*` exactly as MONAI bundle configs do, and run
`python -m monai.bundle` from the repository root the way users do."""

import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_ROOT = REPO_ROOT / "bundle"
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))


def monai_bundle(*args: str, timeout: int = 900) -> str:
    """``python -m monai.bundle ARGS`` from the repository root; fails the test with the log's tail, else returns it."""
    command = [sys.executable, "-m", "monai.bundle", *args]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{log[-6000:]}"
    return log


def bundle_run(run_id: str, config_file: str, *overrides: str, timeout: int = 900) -> str:
    """``python -m monai.bundle run RUN_ID --config_file CONFIG_FILE OVERRIDES`` (see :func:`monai_bundle`)."""
    return monai_bundle("run", run_id, "--config_file", config_file, *overrides, timeout=timeout)


# The start of a script for a process that must not see the bundle's code, as a MONAI Deploy or Triton host
# would load an export: `scripts` is refused by an import hook (run it from a folder outside the repository, so
# neither the installed package nor `bundle/` can supply it either).
WITHOUT_SCRIPTS = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class RefuseScripts(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "scripts" or name.startswith("scripts."):
                raise ModuleNotFoundError(f"No module named {name!r} (refused by the test)")
            return None

    sys.meta_path.insert(0, RefuseScripts())
    try:
        import scripts  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("scripts is importable: the test would prove nothing")
    """
)


def tiny_datalist(root: Path, n_patients_per_grade: int, seed: int) -> Path:
    """A small demo tree (2 slices of 40 px per series) under ``root`` and its datalist, ``root/datalist.json``."""
    from scripts.demo_data import generate_demo_dataset
    from scripts.dicom_index import write_datalist

    data = generate_demo_dataset(
        root, n_patients_per_grade=n_patients_per_grade, slices_per_series=2, image_size=(40, 40), seed=seed
    )
    datalist = root / "datalist.json"
    write_datalist(data["dicom_dir"], data["grades_csv"], str(datalist))
    return datalist
