"""``validate``, ``test`` and ``predict`` from the command line: which weights, and where the
results go.

:func:`prepare_evaluation` is called by the CLI before each of these subcommands
(``TrueGradCLI.before_validate`` / ``before_test`` / ``before_predict``). It

* picks the checkpoint: ``--ckpt_path PATH`` as given; without ``--ckpt_path`` (or with
  ``--ckpt_path best`` / ``last``, which Lightning only understands right after ``fit`` in
  the same process) the best (or newest) checkpoint of the config's **latest run**
  (``<save_dir>/<name>/version_<highest>/checkpoints``), said in one line; with no
  checkpoint at all it stops with a one-line error instead of evaluating an untrained
  model;
* sends the run's logs to the training run's folder instead of a new ``version_N``:
  ``<run>/validate/``, ``<run>/test/`` or ``<run>/predict/`` next to ``<run>/checkpoints``
  (``<run>`` is the checkpoint's ``version_N`` folder, or the checkpoint's own folder
  when it is not in a ``checkpoints`` folder), replacing the results of an earlier run of
  the same subcommand there;
* points every ``ModelCheckpoint`` at the folder recorded in the checkpoint, so loading it
  does not warn that "the dirpath has changed" (nothing is saved outside ``fit``);
* for ``predict``, adds a :class:`~truegrad_lightning.predictions.PredictionCSVWriter`
  (unless the trainer has a prediction writer already): ``<run>/predict/predictions.csv``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from truegrad_lightning.predictions import PredictionCSVWriter

__all__ = [
    "EVALUATION_SUBCOMMANDS",
    "find_checkpoint",
    "prepare_cli_evaluation",
    "prepare_evaluation",
    "run_folder",
]

EVALUATION_SUBCOMMANDS = ("validate", "test", "predict")

_VERSION = re.compile(r"version_(\d+)")


def _say(message: str) -> None:
    if rank_zero_only.rank == 0:
        print(message, flush=True)


def _search_roots(trainer: Trainer) -> list[Path]:
    """Folders whose ``version_N/checkpoints`` (or themselves) hold this config's checkpoints."""
    roots: list[Path] = []
    for cb in trainer.callbacks:  # an explicit ModelCheckpoint(dirpath=...)
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            roots.append(Path(cb.dirpath))
    if trainer.loggers:
        root = getattr(trainer.loggers[0], "root_dir", None)
        if root:
            roots.append(Path(root))
    else:
        roots.append(Path(trainer.default_root_dir))
    return roots


def _best_in(folder: Path, which: str) -> Path:
    """The best (by the ``ModelCheckpoint`` state of the newest file) or newest checkpoint
    in ``folder``."""
    files = sorted(folder.glob("*.ckpt"), key=lambda p: (p.stat().st_mtime, p.name))
    newest = files[-1]
    if which == "last":
        return newest
    try:
        state = torch.load(newest, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 - an unreadable file: fall back to the newest
        return newest
    for key, value in (state.get("callbacks") or {}).items():
        best = value.get("best_model_path") if isinstance(value, dict) else None
        if "ModelCheckpoint" in str(key) and best:
            for candidate in (Path(best), folder / Path(best).name):
                if candidate.is_file():
                    return candidate
    named = [p for p in files if p.name.startswith("best")]
    return named[-1] if named else newest


def find_checkpoint(trainer: Trainer, which: str = "best") -> Path | None:
    """The ``which`` (``"best"`` or ``"last"``) checkpoint of the latest run of the
    trainer's config (the highest ``version_N`` with a checkpoint under the logger's
    ``save_dir/name``, or an explicit ``ModelCheckpoint.dirpath``); ``None`` if there is none."""
    for root in _search_roots(trainer):
        if not root.is_dir():
            continue
        if any(root.glob("*.ckpt")):  # a flat checkpoint folder
            return _best_in(root, which)
        runs = []
        for run in root.iterdir():
            match = _VERSION.fullmatch(run.name)
            if match and any((run / "checkpoints").glob("*.ckpt")):
                runs.append((int(match[1]), run))
        if runs:
            return _best_in(max(runs)[1] / "checkpoints", which)
    return None


def run_folder(ckpt_path: str | Path) -> Path:
    """The training run a checkpoint belongs to: the parent of its ``checkpoints`` folder,
    else the checkpoint's own folder."""
    parent = Path(ckpt_path).parent
    return parent.parent if parent.name == "checkpoints" else parent


def _point_checkpoint_callbacks(trainer: Trainer, ckpt_path: Path) -> None:
    callbacks = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    if not callbacks:
        return
    try:
        states = torch.load(ckpt_path, map_location="cpu", weights_only=False).get("callbacks") or {}
    except Exception:  # noqa: BLE001 - Lightning reports an unreadable checkpoint itself
        states = {}
    for cb in callbacks:
        state = states.get(cb.state_key)
        dirpath = state.get("dirpath") if isinstance(state, dict) else None
        cb.dirpath = dirpath or str(ckpt_path.parent)


def _relocate_logger(trainer: Trainer, subcommand: str, run: Path) -> Path:
    folder = run / subcommand
    if rank_zero_only.rank == 0 and folder.is_dir():
        # the results of an earlier run of this subcommand on this run are replaced
        # (the logger would delete them anyway, with a warning)
        for name in ("metrics.csv", "hparams.yaml", "config.yaml", "predictions.csv"):
            (folder / name).unlink(missing_ok=True)
    if trainer.loggers:
        kind = TensorBoardLogger if isinstance(trainer.loggers[0], TensorBoardLogger) else CSVLogger
        trainer.loggers = [kind(save_dir=str(run), name="", version=subcommand)]
    else:
        trainer.default_root_dir = str(folder)
    return folder


def prepare_evaluation(trainer: Trainer, subcommand: str, ckpt_path: Any) -> str:
    """Gets ``trainer`` ready for ``validate``/``test``/``predict`` of a trained model and
    returns the checkpoint path to pass to it (see the module's docstring).

    Raises ``SystemExit`` with a one-line message when there is no checkpoint to evaluate.
    """
    if subcommand not in EVALUATION_SUBCOMMANDS:
        raise ValueError(f"subcommand must be one of {EVALUATION_SUBCOMMANDS}, got {subcommand!r}")
    which = "best" if ckpt_path in (None, "", "best") else "last" if ckpt_path == "last" else None
    if which is not None:
        found = find_checkpoint(trainer, which)
        if found is None:
            roots = " or ".join(str(r) for r in _search_roots(trainer)) or "the log folder"
            raise SystemExit(
                f"truegrad-lightning {subcommand}: error: no checkpoint to {subcommand} (none "
                f"under {roots}): train first with `truegrad-lightning fit` and this config, "
                "or pass --ckpt_path PATH"
            )
        given = "no --ckpt_path given" if ckpt_path in (None, "") else f"--ckpt_path {ckpt_path}"
        _say(f"{subcommand}: {given}, using the {which} checkpoint of the latest run: {found}")
        path = found
    else:
        path = Path(str(ckpt_path))
        if not path.is_file():
            raise SystemExit(
                f"truegrad-lightning {subcommand}: error: --ckpt_path {ckpt_path} is not a file"
            )
    _point_checkpoint_callbacks(trainer, path)
    folder = _relocate_logger(trainer, subcommand, run_folder(path))
    if subcommand == "predict" and not any(
        isinstance(cb, BasePredictionWriter) for cb in trainer.callbacks
    ):
        trainer.callbacks.append(PredictionCSVWriter(output_dir=str(folder)))
    return str(path)


def prepare_cli_evaluation(cli: Any) -> None:
    """The CLI hook: ``prepare_evaluation`` for ``cli.subcommand``, writing the chosen
    checkpoint into the subcommand's arguments (``cli.config_init[subcommand]["ckpt_path"]``)."""
    arguments = cli.config_init[cli.subcommand]
    arguments["ckpt_path"] = prepare_evaluation(cli.trainer, cli.subcommand, arguments.get("ckpt_path"))
