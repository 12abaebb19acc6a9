"""The run folder's safety rules (``distill --out``): ours or empty, one writer, never inside someone's data.

- Marker: a new run writes ``.ddk-offline-run`` (atomically) before anything else. An existing non-empty folder
  without it is not a run of ours (a model, a dump, a corpus, a home directory): it is refused and nothing in it is
  touched. A run folder made before the marker existed is recognised by its ``checkpoints/`` for ``--resume``.
- Lock: ``.lock`` holds an ``flock`` (:mod:`ddk_offline.runtime.lock`) for the run's life on rank 0; a second run
  on the same ``--out`` is refused with the first one's pid. The kernel drops the lock when a run dies.
- Cleanup: a run refused at start-up removes ``--out`` only when this process created the folder and held its
  lock; a folder that another run is using, or that existed before, is never removed.
- Places: ``--out`` may not be the dump, the student checkpoint, or the corpus folder the dump was made from, nor lie
  inside one of them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ddk_offline import __version__
from ddk_offline.errors import UserError
from ddk_offline.runtime.files import write_bytes_atomic
from ddk_offline.runtime.lock import FolderLock

MARKER = ".ddk-offline-run"
LOCK = ".lock"
_OURS = {MARKER, LOCK}


def check_out(out: Path, *, resume: bool, protected: dict[str, str | None], probe_lock: bool = True) -> None:
    """Refuse an ``--out`` this run must not write into (every rank calls it before anything is written).

    Args:
        out: the ``--out`` folder.
        resume: ``--resume`` (continue the run in ``out``).
        protected: folders that must stay untouched, by the option or source that names them (``None``: absent).
        probe_lock: report a live run in ``out`` first (rank 0 only: probing ranks would see each other).
    """
    target = out.expanduser().resolve()
    for what, place in protected.items():
        if not place or "://" in place:
            continue
        folder = Path(place).expanduser().resolve()
        if folder.is_dir() and (target == folder or folder in target.parents):
            raise UserError(
                f"--out {out}: lies in {what} {folder}, which distill must not write into; choose another --out"
            )
    if not out.exists():
        if resume:
            raise UserError(f"--resume: {out} does not exist; start without --resume")
        return
    if not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder; choose another --out")
    if probe_lock and (out / LOCK).is_file():
        with _lock(out):  # a live run's folder is reported as such, whatever it holds so far
            pass
    entries = sorted(p.name for p in out.iterdir())
    ours = (out / MARKER).is_file() or (resume and (out / "checkpoints").is_dir())
    if not ours and set(entries) - _OURS:
        raise UserError(
            f"--out {out}: the folder is not empty and is not a ddk-offline run (it holds {entries[:5]}); distill "
            "writes only into a new or empty folder or a run of its own. Choose another --out"
        )
    if not resume and ((out / "checkpoints").exists() or (out / "metrics.jsonl").exists()):
        raise UserError(f"--out {out}: holds an earlier run; pass --resume to continue it, or another --out")


def _lock(out: Path) -> FolderLock:
    return FolderLock(
        out / LOCK,
        lambda pid: UserError(
            f"--out {out}: another distill (pid {pid}) is writing to this folder; wait for it to finish, or "
            "choose another --out"
        ),
    )


class RunDir:
    """``--out`` on rank 0 for the run's life: made (if missing), locked, marked.

    Use :meth:`open` once the options are checked, :meth:`close` at the end, and :meth:`discard` when start-up
    fails (it removes the folder only if this process created it and holds its lock).
    """

    def __init__(self, out: Path):
        self.out = out
        self.created = False
        self.lock = _lock(out)

    def open(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.out.mkdir()
            self.created = True
        except FileExistsError:
            if not self.out.is_dir():
                raise UserError(f"--out {self.out}: exists and is not a folder; choose another --out") from None
        except PermissionError as e:
            raise UserError(f"--out {self.out}: cannot create the folder ({e.strerror}); choose another --out") from e
        try:
            self.lock.acquire()
        except PermissionError as e:
            raise UserError(f"--out {self.out}: not writable ({e.strerror}); choose another --out") from e
        if not (self.out / MARKER).is_file():
            stamp = {"created_by": f"ddk-offline {__version__}", "what": "a ddk-offline distill run folder"}
            write_bytes_atomic(self.out / MARKER, (json.dumps(stamp) + "\n").encode())

    def close(self) -> None:
        self.lock.release()

    def discard(self) -> None:
        """After a failed start-up: remove the folder if this process made it and holds its lock; release."""
        if self.created and self.lock.held:
            shutil.rmtree(self.out, ignore_errors=True)
        self.close()


def resume_point(cfg: Any, out: Path, env: Any, manifest: Any):
    """Check ``--out`` for this run, then the checkpoint ``--resume`` continues (None for a new run).

    Refused: an ``--out`` that :func:`check_out` refuses; a resume without a checkpoint, with other settings
    (``DistillConfig.check_resume``), on another dump (``guards.check_same_dump``) or with another process count.
    """
    from ddk_offline.distillation import guards
    from ddk_offline.distillation.checkpoint import latest_checkpoint, load_checkpoint

    corpus = manifest.corpus.get("data") if manifest.corpus.get("layout") != "hub" else None
    protected = {"the dump": cfg.dump, "the --student checkpoint": cfg.student, "the teacher": manifest.local_teacher()}
    protected["the dump's corpus folder"] = corpus
    check_out(out, resume=cfg.resume, protected=protected, probe_lock=env.is_main)
    if not cfg.resume:
        return None
    path = latest_checkpoint(out)
    if path is None:
        raise UserError(f"--resume: no checkpoint in {out / 'checkpoints'}; start without --resume")
    ckpt = load_checkpoint(path)
    cfg.check_resume(ckpt.state["config"], str(path), ckpt.step)
    guards.check_same_dump(ckpt.state.get("dump_identity"), manifest.identity(), str(path), cfg.dump)
    saved_world = int(ckpt.state.get("world", 1))
    if saved_world != env.world:
        raise UserError(
            f"{path}: the run was checkpointed with {saved_world} process(es), this resume has {env.world}; "
            f"the global batch (--batch-size x --grad-accum x processes) would change. Resume with "
            f"{saved_world} process(es)"
        )
    return ckpt


def saved_config(out: Path) -> dict[str, Any]:
    """The settings of the latest checkpoint in ``out`` ({} when there is none; ``resume_point`` then refuses)."""
    from ddk_offline.distillation.checkpoint import latest_checkpoint

    path = latest_checkpoint(out)
    try:
        return json.loads((path / "state.json").read_text(encoding="utf-8"))["config"] if path else {}
    except (OSError, ValueError, KeyError):
        return {}  # load_checkpoint reports a damaged checkpoint with its fix
