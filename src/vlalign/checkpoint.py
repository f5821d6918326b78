"""What a Lightning checkpoint keeps, writing checkpoints and exports atomically, and exporting a trained backbone.

A LoRA run's checkpoint needs only the weights that train (the rest is rebuilt from the config: the same local
checkpoint, or the tiny default's seeded initialisation), so ``keep_trainable`` drops frozen weights and frozen
reference models from ``checkpoint["state_dict"]``. Modules that use it set ``strict_loading = False``.

Atomic writes. A run killed while it writes ``last.ckpt`` (pre-emption, OOM killer, a node lost) must leave the
previous checkpoint loadable and no stray files. Lightning's default stages the file in the system temp dir and
moves it; when that is another filesystem (a ``/tmp`` tmpfs, a node-local disk) the move is a copy, so a kill
leaves a truncated ``last.ckpt`` and a leaked staging file. Here every file or directory is written under a
recognisable temp name IN THE TARGET DIRECTORY (same filesystem), flushed and fsync'ed, then renamed onto the
target (``os.replace``: atomic on POSIX)::

    runs/dpo/checkpoints/.last.ckpt.tmp-<pid>    a checkpoint being written by process <pid>
    runs/dpo/export/.merged.tmp-<pid>            an export being written
    runs/dpo/export/.merged.old-<pid>            the previous export, between the two renames of a swap

``remove_stale_temps`` deletes what killed writers left (and puts back a directory a kill caught between the two
renames of a swap); ``AtomicCheckpointIO`` runs it before its first write to a directory, the CLI before ``fit``.
A checkpoint or export holding a non-finite floating weight is refused (a NaN run must not overwrite the last good
checkpoint or publish NaN weights).

DeepSpeed writes its checkpoints itself (a directory of per-rank shards, ``DeepSpeedStrategy.save_checkpoint``;
no ``CheckpointIO`` is involved) and overwrites the files of ``last.ckpt/`` in place, so a kill mid-save leaves a
mix of two steps. ``AtomicDeepSpeedStrategy`` has every rank write into ``.last.ckpt.tmp-<pid>`` and swaps the
finished directory in: the recipes name it, and ``AlignCLI`` turns ``--trainer.strategy deepspeed_stage_N`` (any
registered DeepSpeed name) into it. A ``DeepSpeedStrategy`` given by ``class_path`` is left as written.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from typing import Any, Iterator, Mapping, Optional

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.strategies import DeepSpeedStrategy, StrategyRegistry

from .zero import gathered

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")


# ------------------------------------------------------------------------------------------- what a checkpoint keeps
def keep_trainable(module: L.LightningModule, checkpoint: dict):
    """Drop the frozen parameters from a checkpoint's state dict (buffers are kept)."""
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    sd = checkpoint.get("state_dict")
    if sd is None:
        return
    for key in list(sd):
        if key in frozen and key not in trainable:
            del sd[key]


def nonfinite_keys(tensors: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors in ``tensors`` holding a NaN or an infinity (others are ignored)."""
    return [k for k, t in tensors.items()
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _refuse_nonfinite(tensors: Mapping[str, Any], what: str):
    bad = nonfinite_keys(tensors)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(f"refusing to write {what}: {len(bad)} weight(s) hold NaN or inf ({shown}). The run "
                         "diverged; the previous checkpoint is kept. Lower the learning rate or check the data.")


# ------------------------------------------------------------------------------------------------- atomic writes
def temp_path(target: str, kind: str = "tmp", pid: Optional[int] = None) -> str:
    """``dir/.name.<kind>-<pid>`` beside ``target``: the same filesystem, so a rename onto ``target`` is atomic."""
    head, name = os.path.split(os.path.abspath(target))
    return os.path.join(head, f".{name}.{kind}-{os.getpid() if pid is None else pid}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove(path: str):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _fsync_dir(path: str):
    """Make a rename in ``path`` durable (a crash of the machine, not just the process)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temps(directory: str) -> list[str]:
    """Clean up after writers that were killed in ``directory``; returns what was removed or restored.

    ``.name.tmp-<pid>`` of a process that no longer exists is deleted (a partial write: the target still holds the
    previous version). ``.name.old-<pid>`` is the previous version of a directory caught between the two renames of
    ``swap_in``: it is renamed back when ``name`` is missing, else deleted. Entries of live processes are left alone.
    """
    if not os.path.isdir(directory):
        return []
    done = []
    for entry in sorted(os.listdir(directory)):
        m = _TEMP.match(entry)
        if not m or _alive(int(m["pid"])):
            continue
        path, target = os.path.join(directory, entry), os.path.join(directory, m["name"])
        if m["kind"] == "old" and not os.path.lexists(target):
            os.replace(path, target)
        else:
            _remove(path)
        done.append(path)
    if done:
        _fsync_dir(directory)
    return done


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """``with atomic_file(p) as tmp: write(tmp)``: ``p`` holds its previous content or the whole new file, never a
    part (written to ``.name.tmp-<pid>`` beside ``p``, fsync'ed, then renamed onto it)."""
    head = os.path.dirname(os.path.abspath(path))
    os.makedirs(head, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(head)


def atomic_torch_save(obj: Any, path: str):
    """``torch.save(obj, path)`` such that ``path`` holds either its previous content or all of ``obj``, never a part.

    Written to ``.name.tmp-<pid>`` beside ``path``, flushed and fsync'ed, then ``os.replace``'d onto it.
    """
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def swap_in(staged: str, target: str):
    """Move the finished directory ``staged`` onto ``target`` (both in one parent), removing the old ``target`` last.

    POSIX cannot atomically replace a non-empty directory, so the old one is first renamed to ``.name.old-<pid>``;
    a kill between the two renames leaves it there and ``remove_stale_temps`` renames it back.
    """
    old = temp_path(target, "old")
    if os.path.lexists(target):
        _remove(old)
        os.replace(target, old)
    os.replace(staged, target)
    _fsync_dir(os.path.dirname(os.path.abspath(target)))
    _remove(old)


@contextlib.contextmanager
def atomic_dir(target: str) -> Iterator[str]:
    """``with atomic_dir("export/merged") as tmp: write(tmp)``: ``target`` changes only if the block completes.

    The block writes into an empty ``.name.tmp-<pid>`` beside ``target``; on success it is swapped in
    (``swap_in``), on an exception it is deleted and ``target`` is untouched.
    """
    tmp = temp_path(target)
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    _remove(tmp)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    swap_in(tmp, target)


def _is_local(path: str) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` that writes atomically in the target directory and refuses NaN weights.

    ``AlignCLI`` installs it as a trainer plugin unless the config names another checkpoint IO (``trainer.plugins``
    or the strategy's ``checkpoint_io``). Remote paths (``s3://...``) go to Lightning's own writer. Loading and
    removal are Lightning's.
    """

    def __init__(self):
        super().__init__()
        self._cleaned: set[str] = set()

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        _refuse_nonfinite(checkpoint.get("state_dict") or {}, f"checkpoint {path}")
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = str(path).removeprefix("file://")
        head = os.path.dirname(os.path.abspath(path))
        if head not in self._cleaned:
            remove_stale_temps(head)
            self._cleaned.add(head)
        atomic_torch_save(checkpoint, path)


class AtomicDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` whose checkpoint directories are swapped in whole (same arguments).

    Every rank writes its shards into ``.last.ckpt.tmp-<pid of rank 0>`` beside the target; after a barrier, global
    rank 0 swaps the finished directory in (``swap_in``). A kill at any moment leaves the previous checkpoint (or,
    between the two renames, its ``.old-`` copy that ``remove_stale_temps`` puts back). Needs one filesystem shared
    by all nodes for the checkpoint directory, as DeepSpeed's own loading does.
    """

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Optional[Any] = None) -> None:
        filepath = self.broadcast(os.path.abspath(str(filepath)))
        staged = self.broadcast(temp_path(filepath))
        if self.is_global_zero:
            remove_stale_temps(os.path.dirname(filepath))
            _remove(staged)
        self.barrier("vlalign_atomic_save_begin")
        super().save_checkpoint(checkpoint, staged, storage_options)
        self.barrier("vlalign_atomic_save_written")
        if self.is_global_zero:
            swap_in(staged, filepath)
        self.barrier("vlalign_atomic_save_done")


def atomic_strategy(strategy):
    """A registered Lightning DeepSpeed name (``"deepspeed_stage_2"``, ...) -> ``AtomicDeepSpeedStrategy`` with the
    same settings; anything else is returned unchanged."""
    if (isinstance(strategy, str) and strategy in StrategyRegistry
            and StrategyRegistry[strategy]["strategy"] is DeepSpeedStrategy):
        return AtomicDeepSpeedStrategy(**StrategyRegistry[strategy]["init_params"])
    return strategy


# --------------------------------------------------------------------------------------------------------- export
def export_backbone(module: L.LightningModule, export_dir: Optional[str]):
    """Export ``module.backbone``: a merged checkpoint (``merged/``) and, with LoRA, the adapter (``adapter/``).

    Written by global rank 0, each into ``.merged.tmp-<pid>`` / ``.adapter.tmp-<pid>`` beside its target and swapped
    in when complete (a previous export is removed only then; a kill leaves it loadable). Refused, on every rank,
    when a weight is not finite. Under DeepSpeed ZeRO-3 the sharded weights are gathered first (every rank takes
    part in the gather).
    """
    if not export_dir:
        return
    bb = module.backbone
    with gathered(bb.parameters(), modify=False):
        _refuse_nonfinite(dict(bb.named_parameters()), f"an export to {export_dir}")
        if module.trainer.global_rank == 0:
            remove_stale_temps(export_dir)
            with atomic_dir(os.path.join(export_dir, "merged")) as tmp:
                bb.export_merged(tmp)
            if bb.has_adapter:
                with atomic_dir(os.path.join(export_dir, "adapter")) as tmp:
                    bb.export_adapter(tmp)
            print(f"exported to {export_dir}")
