"""Atomic file output, and a writability check to run before long work.

Every file fewstep writes goes through a temporary file in the target's folder that is renamed
onto the target with ``os.replace`` once it is complete (and flushed to disk), so a kill, a full
disk or an exception during the write leaves the previous file (or none), never a truncated one.
Temporary names are hidden (``.NAME.<random>.tmp<suffix>``; image folders skip hidden files) and
keep the target's suffix, so writers that pick a format by suffix (PIL) or append one
(``np.savez``) behave as with the real name; a writer that still appends a suffix (``np.savez``
on a name without ``.npz``) is caught instead of leaving an empty file: give it a file object from
:func:`atomic_open`. A temporary file survives only a hard kill.

API::

    atomic_write_bytes(path, data)            # -> Path
    atomic_write_text(path, text, encoding="utf-8")
    atomic_write_json(path, obj, indent=2, **json_kwargs)   # encoded first: a TypeError writes nothing
    with atomic_path(path) as tmp:            # for writers that take a path (np.savez, torch.save,
        np.savez(tmp, ...)                    # safetensors' save_file, PIL Image.save)
    with atomic_open(path, "w") as f:         # for writers that take a file object
        f.write(...)
    with atomic_paths(a, b, c) as (ta, tb, tc):   # several files as one unit: all complete, then renamed
        ...
    check_writable(path, what="--out")        # before the work: the folder exists and takes files
    check_output_dir(folder, what="--out")    # create the folder if needed, then check it takes files
    read_json(path, what="--config")          # a broken file -> ValueError naming it and line:column
    read_checkpoint(path, load)               # a corrupt checkpoint -> ValueError saying which file to delete
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import IO, Any, Iterator

__all__ = ["atomic_path", "atomic_paths", "atomic_open", "atomic_write_bytes", "atomic_write_text",
           "atomic_write_json", "check_writable", "check_output_dir", "read_text", "read_json", "read_checkpoint"]


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); best effort elsewhere."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _new_temp(target: Path) -> Path:
    """Create an empty temporary file next to ``target`` (mode 0o666 minus the umask, as a plain
    ``open`` would give the target) and return its path."""
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp{target.suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"could not create a temporary file next to {target}")  # pragma: no cover


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder for a writer to fill; on a normal exit it is
    flushed to disk and renamed onto ``path``; on any exception (KeyboardInterrupt included) it is
    removed and ``path`` is left as it was."""
    target = Path(path)
    tmp = _new_temp(target)
    try:
        yield tmp
        strays = [p for p in tmp.parent.glob(f"{tmp.name}.*") if p.is_file()]
        if strays:  # e.g. np.savez(str) appends ".npz" to a name without it, leaving tmp empty
            for p in strays:
                p.unlink()
            raise RuntimeError(f"the writer for {target} wrote {strays[0].name} instead of the path it was given "
                               "(it appended a suffix); give it a file object from atomic_open instead")
        with open(tmp, "rb+") as f:  # the writer may have used its own handle: flush it to disk
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_paths(*paths: str | os.PathLike) -> Iterator[tuple[Path, ...]]:
    """Several files written as one unit (weights with their config and record): yield one
    temporary path per target; only when the block completed for all of them are they renamed onto
    their targets, in the order given (put the file that marks the set complete last). On any
    exception every temporary file is removed and no target is touched."""
    with contextlib.ExitStack() as stack:
        tmps = tuple(stack.enter_context(_deferred(Path(p))) for p in paths)
        yield tmps
        # all written: flush each to disk before the first rename, so the renames follow one another
        for tmp in tmps:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        for tmp, target in zip(tmps, paths):
            os.replace(tmp, target)
        for folder in {Path(p).parent for p in paths}:
            _fsync_dir(folder)


@contextlib.contextmanager
def _deferred(target: Path) -> Iterator[Path]:
    """A temporary file next to ``target`` that is removed when the block exits, unless it was
    renamed away (by :func:`atomic_paths`)."""
    tmp = _new_temp(target)
    try:
        yield tmp
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """``open`` for writing whose result appears at ``path`` only when the block completes
    (see :func:`atomic_path`). ``mode`` is ``"w"`` or ``"wb"``; text defaults to UTF-8."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``Path(path)``."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8 by default); returns ``Path(path)``."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, **json_kwargs) -> Path:
    """Write ``obj`` as JSON (plus a final newline) to ``path`` atomically. The object is encoded
    before anything is written, so an unencodable value raises without touching ``path``."""
    text = json.dumps(obj, indent=indent, **json_kwargs) + "\n"
    return atomic_write_text(path, text)


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Check, before any long work, that a file can be written at ``path``: its folder exists, it
    is not a folder itself, and the folder accepts a new file (probed with a temporary file that is
    removed again). ``what`` names the argument in the error. Returns ``Path(path)``.

    Raises FileNotFoundError when the folder is missing, ValueError otherwise.
    """
    p = Path(path)
    folder = p.parent
    if p.is_dir():
        raise ValueError(f"{what}: {str(p)!r} is a folder; give a file name inside it")
    if not folder.exists():
        raise FileNotFoundError(f"{what}: the folder {str(folder)!r} does not exist; create it first "
                                f"(mkdir -p {folder})")
    if not folder.is_dir():
        raise ValueError(f"{what}: {str(folder)!r} is not a folder, so {str(p)!r} cannot be created")
    try:
        tmp = _new_temp(p)
    except OSError as err:
        raise ValueError(f"{what}: cannot write to {str(folder)!r} ({err.strerror or err}); "
                         "choose another location") from err
    tmp.unlink()
    return p


def check_output_dir(folder: str | os.PathLike, what: str = "output folder", create: bool = True) -> Path:
    """Check, before any long work, that files can be written into ``folder``; ``ValueError``
    naming ``what`` and the folder otherwise. ``create``: make the folder (with its parents) now;
    without it nothing is created: the nearest existing ancestor must be a folder that takes new
    entries (make the folder later, when the results are there). Returns ``Path(folder)``."""
    p = Path(folder)
    if not create:
        ancestor = p
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if ancestor.exists() and not ancestor.is_dir():
            raise ValueError(f"{what}: cannot create the folder {str(p)!r}: {str(ancestor)!r} is a file")
        check_writable(ancestor / "probe", what)
        return p
    try:
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"{what}: cannot create the folder {str(p)!r}: a file of that name exists") from None
    except OSError as err:
        raise ValueError(f"{what}: cannot create the folder {str(p)!r} ({err.strerror or err}); "
                         "choose another location") from err
    check_writable(p / "probe", what)
    return p


def read_text(path: str | os.PathLike, what: str = "text file") -> str:
    """The UTF-8 text of the file at ``path``: ``FileNotFoundError`` when it is missing,
    ``ValueError`` when it is not UTF-8 text, both naming ``what`` and the file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what}: {str(p)!r} does not exist")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{what}: {str(p)!r} is not a UTF-8 text file ({err})") from None


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Parse the JSON file at ``path``. A missing file is a ``FileNotFoundError``, a broken one a
    ``ValueError`` naming ``what``, the file and the line:column of the error."""
    p = Path(path)
    text = read_text(p, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what}: {p}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}") from None


def read_checkpoint(path: str | os.PathLike, load, advice: str | None = None) -> Any:
    """``load(path)`` for a resume checkpoint; a file that cannot be read (truncated, corrupt, not
    a checkpoint) is a ``ValueError`` that names it and says what to do (``advice``; default: delete
    it, and the run starts over) instead of the reader's raw error."""
    try:
        return load(path)
    except (OSError, MemoryError) as err:
        if isinstance(err, (FileNotFoundError, PermissionError)):
            raise
        problem = err
    except Exception as err:  # noqa: BLE001 - pickle/zip/torch raise many kinds for a damaged file
        problem = err
    advice = advice or f"delete it (rm {path}) and rerun to start over"
    raise ValueError(f"checkpoint {str(path)!r} is unreadable (corrupt or truncated: {type(problem).__name__}: "
                     f"{problem}); {advice}") from problem
