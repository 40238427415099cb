"""CheckpointManager: the checkpoints of a training run in one directory, each committed
atomically by a small record written last, pruned by a retention rule after each commit,
and resumed from the newest one that verifies. The layout is described in docs/manager.md."""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import os
import secrets
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Union

from . import _files, _io
from ._errors import FormatError
from ._plan import check_metadata
from ._runs import (
    DATA_NAME,
    FORMATS,
    LOCK_NAME,  # noqa: F401  (tests import it from here)
    RECORD_NAME,
    Entry,
    Record,
    canonical_step,
    check_count,
    check_step,
    metric_value,
    parse_record,
    plain_metrics,
    record_name,
    retained,
)
from ._runstore import LocalStore, ObjectStore
from ._tree import no_gc

_Store = Union[LocalStore, ObjectStore]


# --------------------------------------------------------------------------- manager


class CheckpointManager:
    """The checkpoints of one training run, in `directory` (created if missing).

    `save(step, obj)` writes a checkpoint and commits it atomically; after each commit the
    retention rule (see `retained`) removes checkpoints it does not keep. `load()` returns
    the newest checkpoint that verifies, skipping damaged or incomplete newer ones with a
    warning. "Newest" means most recently committed: in a run whose steps only grow that is
    the highest step; after a rewind (saving a step lower than the newest) it is the
    rewound run's latest save, and the checkpoints of the abandoned steps age out by the
    same rule.

    One writing manager per directory: it holds an exclusive lock on the directory from
    construction to close() (or the end of its process); a second one, in this process or
    any other, raises BlockingIOError at once. `read_only=True` takes no lock and only
    reads. Constructing a writing manager removes what killed saves left behind: data not
    named by a commit record and temporary files of dead writers.

    format="tensorfile" writes one tensorfile per step (tensorfile.load, open and verify
    read `path(step)`). format="dcp" writes a torch.distributed.checkpoint directory per
    step through tensorfile.dcp: every rank calls save and load together with its sharded
    state dict; rank 0 holds the lock, commits and applies retention.

    `incremental=True` (format "tensorfile"): a storage whose bytes (by XXH3-128 digest
    and size) equal one a committed checkpoint holds is not written again; the new file
    refers to it (format 1.1), and a data file stays until no committed checkpoint needs
    it. `durable=False` skips the fsyncs (commits stay atomic).

    `directory` may be an object-store prefix ("s3://bucket/run"; `storage_options` as
    for tensorfile.save): the same names become keys under it, the lock is an object
    created by a conditional PUT, and leftovers include the prefix's incomplete multipart
    uploads begun before this process. There, format is "tensorfile" and saves are full
    saves (incremental is False); see docs/manager.md.
    Not thread-safe: call it from one thread (block=False saves run in their own).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        keep_every: int | None = None,
        keep_best: int | None = None,
        metric: str | None = None,
        mode: str = "min",
        incremental: bool = True,
        durable: bool = True,
        format: str = "tensorfile",
        read_only: bool = False,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        from . import _remote

        where = _remote.resolve(directory)
        self._store: _Store
        if isinstance(where, _remote.ObjectURL):
            if format == "dcp":
                raise ValueError(
                    f"tensorfile.CheckpointManager: {directory}: format={format!r} is not "
                    "supported on object stores yet; use format='tensorfile' or a local "
                    "directory"
                )
            self._store = ObjectStore(where.url, storage_options)
            self.directory = self._store.location
        else:
            if storage_options is not None:
                raise ValueError(
                    "tensorfile.CheckpointManager: storage_options is for object-store URLs; "
                    f"{directory} is a local directory"
                )
            self.directory = os.path.abspath(os.fspath(where))
            self._store = LocalStore(self.directory)
        self.keep_last = check_count("keep_last", keep_last, 0)
        self.keep_every = check_count("keep_every", keep_every, 1)
        self.keep_best = check_count("keep_best", keep_best, 0)
        if mode not in ("min", "max"):
            raise ValueError(
                f"tensorfile.CheckpointManager: mode must be 'min' or 'max', got {mode!r}"
            )
        if keep_best is not None and not isinstance(metric, str):
            raise ValueError(
                "tensorfile.CheckpointManager: keep_best needs metric= (a metric name)"
            )
        if format not in FORMATS:
            raise ValueError(
                f"tensorfile.CheckpointManager: format must be 'tensorfile' or 'dcp', got {format!r}"
            )
        for name, flag in (
            ("incremental", incremental),
            ("durable", durable),
            ("read_only", read_only),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"tensorfile.CheckpointManager: {name} must be a bool")
        self.metric = metric
        self.mode = mode
        # Object-store saves are full saves: readers follow format 1.1 references only
        # between files of one local directory.
        self.incremental = incremental and isinstance(self._store, LocalStore)
        self.durable = durable
        self.format = format
        self.read_only = read_only
        self._pending: concurrent.futures.Future[None] | None = None
        self._errors: list[BaseException] = []
        self._mutex = threading.Lock()  # one commit, retention or delete at a time
        self._lock: Any = None
        self._dist = _Dist() if format == "dcp" else None
        leader = self._dist is None or self._dist.rank == 0
        remote = isinstance(self._store, ObjectStore)
        if read_only:
            if not remote and not os.path.isdir(self.directory):
                raise FileNotFoundError(
                    errno.ENOENT, f"tensorfile.CheckpointManager: no directory {self.directory}"
                )
        else:
            if not remote:
                os.makedirs(self.directory, exist_ok=True)
            if leader:
                self._lock = self._store.lock()
        try:
            for e in self._scan():
                if e.record is not None and e.record.kind != format:
                    raise FormatError(
                        f"{self.directory}: holds checkpoints of format {e.record.kind!r} "
                        f"({record_name(e.step)}); open it with format={e.record.kind!r}"
                    )
            if self._lock is not None:
                self._remove_leftovers()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ reading

    def _scan(self) -> list[Entry]:
        """Every step that has a record file, ascending."""
        entries = []
        listing = self._store.listing()
        for name in listing:
            m = RECORD_NAME.match(name)
            step = canonical_step(m[1]) if m else None
            if step is None:
                continue
            where = self._store.target(name)
            try:
                rec = parse_record(self._store.read_record(name, listing), where, step)
            except FileNotFoundError:
                continue  # removed by retention meanwhile
            except FormatError as e:
                entries.append(Entry(step, None, str(e)))
                continue
            entries.append(Entry(step, rec, self._store.data_problem(rec, listing)))
        return sorted(entries, key=lambda e: e.step)

    def _committed(self) -> dict[int, Record]:
        return {e.step: e.record for e in self._scan() if e.problem is None and e.record}

    def steps(self) -> list[int]:
        """The committed steps whose data is present, ascending. Reads the directory."""
        return sorted(self._committed())

    def latest(self) -> int | None:
        """The most recently committed step (the highest, unless the run rewound), or None."""
        recs = self._committed().values()
        return max(recs, key=lambda r: r.sequence).step if recs else None

    def _record(self, step: int) -> Record:
        step = check_step(step)
        for e in self._scan():
            if e.step == step:
                if e.problem is not None:
                    raise FormatError(
                        f"{self.directory}: checkpoint of step {step} is damaged or incomplete: "
                        f"{e.problem}"
                    )
                assert e.record is not None
                return e.record
        raise FileNotFoundError(
            errno.ENOENT,
            f"{self.directory}: no committed checkpoint of step {step} (committed: {self.steps()})",
        )

    def path(self, step: int) -> str:
        """The file of a checkpoint (its directory for format "dcp"; its URL under an
        object-store prefix), for tensorfile.load, open, verify
        (tensorfile.dcp.StorageReader for "dcp")."""
        return self._store.target(self._record(step).data)

    def metrics(self, step: int) -> dict[str, Any]:
        """The metrics saved with a checkpoint (numbers, bools, str, None)."""
        return dict(self._record(step).metrics)

    def metadata(self, step: int) -> dict[str, str]:
        """The str -> str metadata saved with a checkpoint."""
        return dict(self._record(step).metadata)

    def load(
        self,
        step: int | None = None,
        map_location: Any = None,
        *,
        into: Any = None,
        verify: bool = True,
    ) -> Any:
        """Loads a checkpoint: the one of `step`, or with step=None the most recent one
        that loads and verifies. A newer one that is damaged or incomplete is skipped with
        a warning naming it and the reason. Waits for a pending block=False save first.

        `map_location`, `into` and `verify` are those of tensorfile.load; a checkpoint
        skipped after its bytes were read may have written into `into` before its damage
        was found, and the one loaded next overwrites every tensor it holds. Raises
        FileNotFoundError when nothing is committed (or `step` is not), and
        FormatError/ChecksumError for a damaged `step` or when every checkpoint is damaged.
        For format "dcp" every rank calls this together; `into` is the sharded state dict
        to fill (it is returned), or None to read full tensors in one process."""
        self._drain()
        if self.format == "dcp" and map_location is not None:
            raise ValueError(
                "tensorfile.CheckpointManager.load: format 'dcp' loads onto the devices of "
                "into's tensors; map_location is not supported"
            )
        if step is not None:
            return self._load_one(self._record(step), map_location, into, verify)
        entries = self._scan()
        if self._dist is not None and into is not None:
            entries = self._dist.from_leader(entries)
        ranked = sorted(
            (e for e in entries if e.record is not None),
            key=lambda e: e.record.sequence,  # type: ignore[union-attr]
            reverse=True,
        )
        unreadable = [(e.step, e.problem or "") for e in entries if e.record is None]
        if not ranked and not unreadable:
            raise FileNotFoundError(
                errno.ENOENT, f"{self.directory}: no committed checkpoint to load"
            )
        skipped: list[tuple[int, str]] = []
        for e in ranked:
            assert e.record is not None
            problem = e.problem
            if problem is None:
                try:
                    out = self._load_one(e.record, map_location, into, verify)
                except (FormatError, FileNotFoundError) as err:
                    problem = str(err)
                except BaseException as err:
                    problem = _dcp_damage(err)
                    if problem is None:
                        self._warn(skipped, None)
                        raise
                else:
                    self._warn(skipped + [u for u in unreadable if u[0] > e.step], e.step)
                    return out
            skipped.append((e.step, problem))
        skipped += unreadable
        raise FormatError(
            f"{self.directory}: no checkpoint loads ({len(skipped)} damaged or incomplete): "
            + "; ".join(f"step {step}: {problem}" for step, problem in skipped[:4])
        )

    def _warn(self, skipped: list[tuple[int, str]], loaded: int | None) -> None:
        then = f"; loaded step {loaded} instead" if loaded is not None else ""
        for step, problem in skipped:
            warnings.warn(
                f"tensorfile.CheckpointManager: skipped the checkpoint of step {step} in "
                f"{self.directory}: {problem}{then}",
                RuntimeWarning,
                stacklevel=3,
            )

    def _load_one(self, rec: Record, map_location: Any, into: Any, verify: bool) -> Any:
        path = self._store.target(rec.data)
        if rec.kind == "tensorfile":
            from .api import load

            return load(
                path,
                map_location,
                into=into,
                verify=verify,
                storage_options=self._store.storage_options,
            )
        from . import dcp as tdcp

        if into is None:
            return tdcp.dcp_to_state_dict(path)
        assert self._dist is not None
        self._dist.dcp_load(into, tdcp.StorageReader(path, verify=verify))
        return into

    # ------------------------------------------------------------------ writing

    def save(
        self,
        step: int,
        obj: Any,
        *,
        metrics: dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None,
        block: bool = True,
    ) -> concurrent.futures.Future[None] | None:
        """Saves `obj` as the checkpoint of `step` and commits it; an existing checkpoint
        of that step is replaced atomically (the old one stays whole until the new one
        commits). Then applies retention. `metrics` (str -> number, bool, str or None;
        one-element tensors are turned into numbers) are kept in the commit record and
        rank checkpoints for keep_best; `metadata` (str -> str) also goes in the file's
        header. Returns None once committed.

        block=False returns a Future at once, after copying every tensor into
        async_save's reusable buffer pool, so the caller may change its tensors right
        away. At most one save is in flight: a save waits for the previous one first, so
        saves commit in call order and host memory stays that of one snapshot. The error
        of a failed block=False save is raised by its future, then once by the next
        save() or wait(). TypeError naming the key path for what cannot be saved is raised
        here, at once. format "dcp" saves block (every rank calls save together)."""
        if self.read_only:
            raise RuntimeError("tensorfile.CheckpointManager: read_only=True; cannot save")
        step = check_step(step)
        plain = plain_metrics(metrics)
        meta = check_metadata(metadata)
        self._drain()
        self._raise_error()
        if self._dist is not None:
            if not block:
                raise ValueError(
                    "tensorfile.CheckpointManager.save: format 'dcp' saves with block=True "
                    "(its collectives must not run beside the training loop's)"
                )
            self._save_dcp(step, obj, plain, meta)
            return None
        name = f"step-{step:08d}.{secrets.token_hex(4)}.tf"
        target = self._store.target(name)
        reuse = _io.Reuse(self._held()) if self.incremental else None
        _files.phase("manager:data")
        if block:
            with no_gc():
                _io.save(
                    obj,
                    target,
                    durable=self.durable,
                    num_threads=None,
                    metadata=meta or None,
                    reuse=reuse,
                    storage_options=self._store.storage_options,
                )
            self._commit(step, name, plain, meta, reuse)
            return None
        from ._async import save_in_background

        written = save_in_background(
            obj,
            target,
            durable=self.durable,
            num_threads=None,
            metadata=meta or None,
            reuse=reuse,
            storage_options=self._store.storage_options,
        )
        fut: concurrent.futures.Future[None] = concurrent.futures.Future()
        fut.set_running_or_notify_cancel()

        def finish() -> None:
            try:
                written.result()
                self._commit(step, name, plain, meta, reuse)
            except BaseException as e:
                self._errors.append(e)
                fut.set_exception(e)
            else:
                fut.set_result(None)

        threading.Thread(target=finish, name=f"tensorfile-manager:{step}", daemon=False).start()
        self._pending = fut
        return fut

    def _held(self) -> dict[bytes, _io.Held]:
        """{digest: where those bytes lie} over the committed checkpoints' storages."""
        index: dict[bytes, _io.Held] = {}
        for rec in self._committed().values():
            for digest, holder, j, nbytes, crc in rec.storages or ():
                if digest is not None:
                    index.setdefault(bytes.fromhex(digest), _io.Held(holder, j, nbytes, crc))
        return index

    def _commit(
        self,
        step: int,
        name: str,
        metrics: dict[str, Any],
        metadata: dict[str, str],
        reuse: _io.Reuse | None = None,
    ) -> None:
        """Writes the commit record of data `name` (already in place), then removes the
        data it replaces and applies retention."""
        with self._mutex:
            try:
                entries = self._scan()
                before = next((e.record for e in entries if e.step == step), None)
                sequence = 1 + max((e.record.sequence for e in entries if e.record), default=0)
                nbytes = self._store.data_nbytes(name) if self.format == "tensorfile" else None
                rec = Record(
                    step,
                    sequence,
                    name,
                    self.format,
                    nbytes,
                    metrics,
                    metadata,
                    time.time(),
                    None if reuse is None else _storage_rows(name, reuse),
                )
                blob = rec.to_json()
                _files.phase("manager:record")
                self._store.write_record(record_name(step), blob, self.durable)
            except BaseException:
                with contextlib.suppress(OSError):
                    self._store.remove_data(name)
                raise
            _files.phase("manager:committed")
            if before is not None and before.data != name:
                self._sweep([before.data])
            self._apply_retention()

    def _apply_retention(self) -> None:
        committed = self._committed()
        keep = retained(
            ((s, r.sequence, metric_value(r.metrics, self.metric)) for s, r in committed.items()),
            keep_last=self.keep_last,
            keep_every=self.keep_every,
            keep_best=self.keep_best,
            mode=self.mode,
        )
        self._remove([r for s, r in committed.items() if s not in keep])

    def _remove(self, records: list[Record]) -> None:
        """Uncommits each checkpoint (its record goes first, made durable), then removes
        its data, so that a crash in between leaves only unnamed data for clean-up."""
        if not records:
            return
        _files.phase("manager:retention")
        for rec in records:
            self._store.remove_record(record_name(rec.step))
            _files.phase("manager:uncommitted")
        self._store.records_removed(self.durable)
        self._sweep([rec.data for rec in records])

    def _sweep(self, candidates: list[str]) -> None:
        """Removes the data files among `candidates`, and the files held only for their
        storages, that no committed checkpoint needs any more (incremental checkpoints
        refer to the storages of older files)."""
        needed: set[str] = set()
        for e in self._scan():
            if e.record is not None:
                needed |= e.record.uses()
        held = {
            n
            for n in self._store.listing()
            if DATA_NAME.match(n) and n not in needed and n.endswith(".tf")
        }
        for name in dict.fromkeys([*candidates, *sorted(held)]):
            if name not in needed:
                with contextlib.suppress(FileNotFoundError):
                    self._store.remove_data(name)
                _files.phase("manager:removed")

    def delete(self, step: int) -> None:
        """Removes the checkpoint of `step` (committed or not whole); FileNotFoundError if
        it has no record. Waits for a pending save first. With format "dcp" rank 0
        removes it and the other ranks return at once."""
        if self.read_only:
            raise RuntimeError("tensorfile.CheckpointManager: read_only=True; cannot delete")
        step = check_step(step)
        self._drain()
        if self._dist is not None and self._dist.rank != 0:
            return
        with self._mutex:
            entry = next((e for e in self._scan() if e.step == step), None)
            if entry is None:
                raise FileNotFoundError(
                    errno.ENOENT, f"{self.directory}: no checkpoint of step {step} to delete"
                )
            if entry.record is not None:
                self._remove([entry.record])
            else:
                self._store.remove_record(record_name(step))

    def _remove_leftovers(self) -> None:
        """Removes data no record names (saves killed before their commit, or replaced
        and removed checkpoints killed mid-removal) and temporary files of dead writers.
        Data of a step whose record cannot be read is left alone."""
        entries = self._scan()
        named: set[str] = set()
        for e in entries:
            if e.record is not None:
                named |= e.record.uses()
        unreadable = {e.step for e in entries if e.record is None}
        for name in self._store.listing():
            m = DATA_NAME.match(name)
            step = canonical_step(m[1]) if m else None
            if step is None or name in named or step in unreadable:
                continue
            self._store.remove_data(name)
        self._store.clean()

    def _save_dcp(self, step: int, obj: Any, metrics: dict[str, Any], meta: dict[str, str]) -> None:
        from . import dcp as tdcp

        assert self._dist is not None
        dist = self._dist
        name = dist.from_leader(f"step-{step:08d}.{secrets.token_hex(4)}.dcp")
        path = self._store.target(name)
        _files.phase("manager:data")
        try:
            dist.dcp_save(obj, tdcp.StorageWriter(path, durable=self.durable))
        except BaseException:
            if dist.rank == 0:
                with contextlib.suppress(OSError):
                    self._store.remove_data(name)
            raise
        error: BaseException | None = None
        if dist.rank == 0:
            try:
                self._commit(step, name, metrics, meta)
            except BaseException as e:
                error = e
        failed = dist.from_leader(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        if failed is not None:
            raise RuntimeError(
                f"tensorfile.CheckpointManager: rank 0 could not commit step {step}: {failed}"
            )

    # ------------------------------------------------------------------ lifetime

    def _drain(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            concurrent.futures.wait([pending])

    def _raise_error(self) -> None:
        if self._errors:
            first = self._errors[0]
            self._errors.clear()
            raise first

    def wait(self) -> None:
        """Waits for the pending block=False save; raises the first error of the saves
        whose errors were not raised yet (then forgets them)."""
        self._drain()
        self._raise_error()

    def close(self) -> None:
        """Waits for the pending save, then releases the directory's lock. Raises like wait()."""
        try:
            self.wait()
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointManager({self.directory!r}, format={self.format!r})"


def _storage_rows(name: str, reuse: _io.Reuse) -> list[list[Any]]:
    """The record's storage rows: each storage's digest and the file holding its bytes."""
    rows: list[list[Any]] = []
    for s, (digest, nbytes, crc) in enumerate(
        zip(reuse.digests, reuse.nbytes.tolist(), reuse.crcs.tolist())
    ):
        held = reuse.refs.get(s)
        holder, j = (name, s) if held is None else (held.file, held.storage)
        rows.append([None if digest is None else digest.hex(), holder, j, nbytes, crc])
    return rows


def _dcp_damage(err: BaseException) -> str | None:
    """For a DCP load's CheckpointException: the damage it reports, or None if some rank
    failed for another reason (a state dict that does not fit, a lost peer)."""
    failures = getattr(err, "failures", None)
    if type(err).__name__ != "CheckpointException" or not isinstance(failures, dict):
        return None
    reasons = []
    for rank, failure in sorted(failures.items()):
        exc = failure[0] if isinstance(failure, tuple) else failure
        text = str(exc)
        # DCP reports an unreadable commit record as "metadata is None; ... read failed: ...".
        damaged = isinstance(exc, (FormatError, FileNotFoundError)) or (
            isinstance(exc, AssertionError) and text.startswith("metadata is None")
        )
        if not damaged:
            return None
        reasons.append(f"rank {rank}: {text}")
    return "; ".join(reasons) or None


class _Dist:
    """The torch.distributed facts format "dcp" needs: this rank, and the collectives
    (through the default process group; none without one)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0

    def from_leader(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank."""
        if not self.active:
            return value
        box = [value]
        self._dist.broadcast_object_list(box, src=0)
        return box[0]

    @contextlib.contextmanager
    def _quiet(self) -> Iterator[None]:
        # Without a process group DCP warns that it saves in one process, which is the intent.
        with warnings.catch_warnings():
            if not self.active:
                warnings.filterwarnings("ignore", "torch.distributed is disabled")
            yield

    def dcp_save(self, state: Any, writer: Any) -> None:
        import torch.distributed.checkpoint as dcp

        with self._quiet():
            dcp.save(state, storage_writer=writer, no_dist=not self.active)

    def dcp_load(self, state: Any, reader: Any) -> None:
        import torch.distributed.checkpoint as dcp

        with self._quiet():
            dcp.load(state, storage_reader=reader, no_dist=not self.active)
