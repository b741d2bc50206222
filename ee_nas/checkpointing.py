"""Crash-safe training state: atomic checkpoints every epoch and on SIGINT/SIGTERM, and resuming from them."""
from __future__ import annotations

import logging
import signal
import warnings
from pathlib import Path

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from ee_nas.lit_module import non_finite_tensors
from ee_nas.utils import atomic_write

log = logging.getLogger(__name__)


class RunInterrupted(BaseException):
    """SIGINT/SIGTERM stopped the run. A BaseException, so no `except Exception` (a failed
    candidate, for one) swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temp file in the same folder and renamed: a kill never leaves half a file
    (Lightning stages local files in the system temp dir, so its final move may be a copy)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(path, lambda f: torch.save(checkpoint, f), binary=True)


class LastCheckpoint(ModelCheckpoint):
    """`checkpoints/last.ckpt` after every training epoch, and when SIGINT/SIGTERM stops training.

    SIGTERM (Lightning's handler) and the first Ctrl+C (ours, while training) let the current
    batch finish; the state is then saved and the run exits, so a rerun resumes exactly where
    it stopped. A second Ctrl+C aborts at once. Other exceptions save nothing: after a NaN loss
    the previous epoch's checkpoint stays (and non-finite weights are never saved, see
    `MultiExitModule.on_save_checkpoint`).
    """

    def __init__(self, dirpath: str | Path):
        super().__init__(dirpath=str(dirpath), filename="last", save_top_k=1, every_n_epochs=1,
                         save_on_train_epoch_end=True, enable_version_counter=False)
        self.received: int | None = None  # the signal that stopped training
        self._sigint = None

    @property
    def path(self) -> str:
        return str(Path(self.dirpath) / f"last{self.FILE_EXTENSION}")

    def on_train_start(self, trainer, pl_module) -> None:
        def stop_after_batch(signum, frame):
            if self.received is not None:
                raise KeyboardInterrupt
            self.received = signum
            log.warning("Ctrl+C: stopping after this batch and saving %s (press it again to abort now)", self.path)
            trainer._signal_connector.received_sigterm = True  # Lightning's graceful SIGTERM stop
        try:
            self._sigint = signal.signal(signal.SIGINT, stop_after_batch)
        except ValueError:  # not the main thread: keep Lightning's KeyboardInterrupt handling
            self._sigint = None

    def _restore_sigint(self) -> None:
        if self._sigint is not None:
            signal.signal(signal.SIGINT, self._sigint)
            self._sigint = None

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_sigint()
        super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_sigint()
        if not isinstance(exception, SIGTERMException):
            return
        self.received = self.received or signal.SIGTERM
        if self._last_global_step_saved == trainer.global_step:
            return
        bad = non_finite_tensors(pl_module.state_dict())
        if bad:
            log.warning("not saving the interrupted run: non-finite weights (%s)", bad[0])
            return
        self._save_checkpoint(trainer, self.path)
        log.warning("saved %s at epoch %d, step %d", self.path, trainer.current_epoch, trainer.global_step)


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    last = run_dir / "checkpoints" / "last.ckpt"
    if cfg.get("resume", True) and last.exists():
        log.info("resuming supernet training from %s", last)
        # a mid-epoch checkpoint (SIGTERM/Ctrl+C) resumes exactly: the sampler skips the trained batches
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
        return str(last)
    return None
