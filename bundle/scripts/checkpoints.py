"""Resume checkpoints: written atomically every N epochs, and for the last finished epoch when a run stops early.

A resume checkpoint holds the weights, the optimizer's state (Adam's two moments double its size), the learning
rate schedule and the engine's counters; with two AlexNet branches it is hundreds of megabytes, so writing it
every epoch can cost a noticeable share of a short epoch. :class:`ResumeCheckpointer` therefore writes one every
``interval`` epochs and after the last one, and keeps, in memory, the state of the last finished epoch in
between. When the run stops on an error or Ctrl-C, :func:`run_training` writes that state: the run resumes
(``--resume true``) exactly where an uninterrupted one would be at that epoch boundary, because every random draw
of an epoch is seeded from the seed and the epoch (``scripts.reproducibility``). A mid-epoch state is never
written: resuming from it could not repeat the epoch's remaining batches.

Why not MONAI's ``CheckpointSaver``: it writes in place (``DiskSaver(atomic=False)``), so a kill during a save
leaves a truncated file under the checkpoint's name, and a resumed run starts its own list of saved files, so
the checkpoint it resumed from stays beside the new ones. Here every file is written under a temporary name and
renamed (:func:`atomic_save`), and each new checkpoint removes the older ones in the folder.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import time
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from scripts.flags import as_flag

__all__ = [
    "ResumeCheckpointer",
    "atomic_save",
    "atomic_write_text",
    "latest_checkpoint",
    "resume_handlers",
    "run_training",
]

logger = logging.getLogger(__name__)

PREFIX = "checkpoint"
_EPOCH_IN_NAME = re.compile(r"epoch=(\d+)")


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """``write`` a temporary file in the same folder, then rename it to ``path``: the file is whole or absent.

    The temporary name holds the process id, so processes that write the same file at once (parallel tuning
    trials) never write into each other's temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda partial: torch.save(obj, partial))


def atomic_write_text(text: str, path: str | Path) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda partial: partial.write_text(text))


def _checkpoints(ckpt_dir: str | Path, prefix: str = PREFIX) -> list[tuple[int, Path]]:
    found = []
    for path in Path(ckpt_dir).glob(f"{prefix}*.pt"):
        match = _EPOCH_IN_NAME.search(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(ckpt_dir: str | Path, prefix: str = PREFIX) -> str | None:
    """Path of the newest resumable checkpoint (``<prefix>*epoch=N.pt``) in ``ckpt_dir``, or None."""
    found = _checkpoints(ckpt_dir, prefix)
    return str(found[-1][1]) if found else None


def _state_of(objects: Mapping[str, Any]) -> dict[str, Any]:
    return {name: obj.state_dict() for name, obj in objects.items()}


def _to_cpu_copy(state: Any) -> Any:
    """A deep copy whose tensors live on the CPU, so the snapshot survives the next optimizer step."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, Mapping):
        return {k: _to_cpu_copy(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_to_cpu_copy(v) for v in state)
    return copy.deepcopy(state)


class ResumeCheckpointer:
    """Write ``save_dir/checkpoint_epoch=N.pt`` (the state_dicts of ``save_dict``) every ``interval`` epochs and
    after the last epoch; between those, keep the last finished epoch's state in memory for :meth:`save_last`.
    With ``interval=1`` nothing is kept in memory (the last finished epoch is always on disk).

    With ``resume`` it first loads the newest checkpoint in ``save_dir`` into ``save_dict`` when the run starts
    (:func:`resume_handlers`); ``write=False`` only loads (the ranks after the first of a distributed run).
    """

    def __init__(
        self,
        save_dir: str | Path,
        save_dict: Mapping[str, Any],
        interval: int = 1,
        resume: bool = False,
        write: bool = True,
        map_location: Any = None,
    ) -> None:
        interval = int(interval)
        if interval < 1:
            raise ValueError(f"checkpoint_interval must be at least 1 epoch, got {interval}")
        self.save_dir, self.save_dict, self.interval = Path(save_dir), dict(save_dict), interval
        self.resume, self.write, self.map_location = as_flag(resume), as_flag(write), map_location
        self._pending: tuple[int, dict] | None = None  # (epoch, state) not yet on disk
        self._engine: Engine | None = None

    def attach(self, engine: Engine) -> None:
        """Load the checkpoint to resume from (if asked) and write checkpoints; attaching twice changes nothing."""
        if engine is self._engine:
            return
        self._engine = engine
        for loader in resume_handlers(self.resume, str(self.save_dir), self.save_dict, self.map_location):
            loader.attach(engine)
        if self.write:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def epoch_completed(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        if epoch % self.interval == 0 or epoch >= engine.state.max_epochs:
            self._pending = None
            self._write(epoch, _state_of(self.save_dict))
        else:
            self._pending = (epoch, _to_cpu_copy(_state_of(self.save_dict)))

    def save_last(self) -> Path | None:
        """Write the last finished epoch's state if it is not on disk yet (called when a run stops early)."""
        if self._pending is None:
            return None
        epoch, state = self._pending
        self._pending = None
        return self._write(epoch, state)

    def _write(self, epoch: int, state: dict) -> Path:
        started = time.perf_counter()
        path = atomic_save(state, self.save_dir / f"{PREFIX}_epoch={epoch}.pt")
        for _, older in _checkpoints(self.save_dir):
            if older != path:
                older.unlink(missing_ok=True)
        seconds = time.perf_counter() - started
        logger.info("resume checkpoint %s: %.0f MB in %.1f s", path, path.stat().st_size / 1e6, seconds)
        return path


def _unreadable(path: Path) -> str:
    """Why ``path`` is not a whole ``torch.save`` archive (a zip whose index sits at its end), or ''."""
    try:
        with zipfile.ZipFile(path):
            return ""
    except (OSError, zipfile.BadZipFile) as error:
        return str(error)


def run_training(trainer: Engine, checkpointer: ResumeCheckpointer | None = None) -> Engine:
    """Attach ``checkpointer`` (it refers to the trainer, so it cannot be one of the trainer's own handlers) and
    ``trainer.run()``; if the run stops on an error or Ctrl-C, first write the last finished epoch's checkpoint."""
    if checkpointer is not None:
        checkpointer.attach(trainer)
    try:
        trainer.run()
    except BaseException:
        if checkpointer is not None:
            saved = checkpointer.save_last()
            if saved is not None:
                logger.warning("the run stopped; resume from %s with --resume true", saved)
        raise
    return trainer


def resume_handlers(resume: bool, ckpt_dir: str, load_dict: Mapping[str, object], map_location=None) -> list:
    """A `CheckpointLoader` for the last checkpoint when ``resume`` is set, else nothing.

    Asking to resume with no checkpoint is an error, not a silent fresh start: a user who resumes expects
    the weights, optimizer, scheduler and epoch counter of the run they stopped.
    """
    if not as_flag(resume):  # `--resume false` arrives as the string "false"
        return []
    from monai.handlers import CheckpointLoader

    path = latest_checkpoint(ckpt_dir)
    if path is None:
        raise FileNotFoundError(f"--resume was set but {ckpt_dir} holds no checkpoint*epoch=N.pt to resume from")
    problem = _unreadable(Path(path))
    if problem:
        older = [str(p) for _, p in _checkpoints(ckpt_dir)[:-1] if not _unreadable(p)]
        offer = f"; {older[-1]} is readable: remove the damaged file to resume from it" if older else ""
        raise ValueError(
            f"the resume checkpoint {path} is damaged ({problem}), e.g. truncated by a copy or a full disk{offer}. "
            "To start afresh instead: --resume false --overwrite true"
        )
    logger.info("resuming from %s", path)
    return [CheckpointLoader(load_path=path, load_dict=dict(load_dict), map_location=map_location)]
