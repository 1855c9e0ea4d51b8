"""Local files as a corpus: listing a folder tree, naming each file by a URI, opening it again.

* :func:`walk` lists every regular file under a folder whose name has one of the extensions, each real
  file ONCE (a symlink or hard link to a file already listed is a duplicate, not a second video),
  following symlinked folders without looping, at any depth (it walks with directory file descriptors,
  so a tree deeper than ``PATH_MAX`` is no error). What it cannot list it counts in a
  :class:`ListingReport` (reason -> count, with a few example paths) and logs a warning naming the folder;
  nothing is silently dropped and no single entry stops the listing.
* :func:`uri_for` / :func:`path_of`: a path whose bytes are valid UTF-8 is its own URI; one that is not
  (file names from old NAS exports in Latin-1) becomes ``file://`` + the percent-encoded bytes, which
  Parquet can store and :func:`path_of` turns back into the exact same bytes. ``file://`` URIs are
  percent-decoded (RFC 8089), so ``file:///a%20b.mp4`` names ``/a b.mp4``.
* :func:`open_file` opens a path for reading, also one longer than ``PATH_MAX`` (one directory at a time).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

EXAMPLES = 5  # example paths kept per reason


@dataclass
class ListingReport:
    """What a listing saw but did not list: ``skipped[reason]`` counts, ``examples[reason]`` a few paths."""

    listed: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, path: str, warn: bool = False, detail: str = "") -> None:
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES:
            shown.append(printable(path))
        if warn:
            log.warning("input: %s: %s%s", reason, printable(path), f" ({detail})" if detail else "")

    def lines(self) -> list[str]:
        return [f"{reason}: {n} (e.g. {', '.join(self.examples.get(reason, []))})" for reason, n in sorted(self.skipped.items())]


def printable(path: str) -> str:
    """A path for a log line or a message (undecodable bytes shown as ``\\xNN``)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def uri_for(path: str) -> str:
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:  # surrogate-escaped bytes of a non-UTF-8 name
        return "file://" + urllib.parse.quote(os.fsencode(path), safe="/")


def path_of(uri: str) -> str:
    if uri.startswith("file://"):
        return os.fsdecode(urllib.parse.unquote_to_bytes(uri[len("file://"):]))
    return uri


_O_DIR = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC


def open_file(path: str, flags: int = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK) -> int:
    """``os.open`` that also opens paths longer than ``PATH_MAX`` (raises ``OSError`` like ``os.open``).
    ``O_NONBLOCK`` by default: a FIFO named ``.mp4`` must not block the opener (regular files ignore it)."""
    try:
        return os.open(path, flags)
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
    parts = [p for p in path.split("/") if p]
    fd = os.open("/" if path.startswith("/") else ".", _O_DIR)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, _O_DIR, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return os.open(parts[-1], flags, dir_fd=fd)
    finally:
        os.close(fd)


def walk(root: str, extensions: list[str], report: ListingReport) -> Iterator[str]:
    """Paths (``root`` + relative names) of the matching files under ``root``, each real file once."""
    exts = tuple(e.lower() for e in extensions)
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: dict[tuple[int, int], str] = {}
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    st = os.fstat(fd)
    seen_dirs.add((st.st_dev, st.st_ino))
    try:
        yield from _walk_dir(fd, root.rstrip("/") or "/", exts, seen_dirs, seen_files, report)
    finally:
        os.close(fd)


def _walk_dir(fd: int, path: str, exts: tuple[str, ...], seen_dirs, seen_files, report: ListingReport) -> Iterator[str]:
    try:
        with os.scandir(fd) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        report.skip(_reason(exc, "folders that could not be read"), path, warn=True, detail=exc.strerror or str(exc))
        return
    for entry in entries:
        full = f"{path}/{entry.name}" if path != "/" else f"/{entry.name}"
        try:
            st = os.stat(entry.name, dir_fd=fd)  # follows symlinks
        except OSError as exc:
            if entry.name.lower().endswith(exts):
                if exc.errno in (errno.EACCES, errno.EPERM):  # listed; reading it is denied -> access_denied row
                    report.listed += 1
                    yield full
                else:
                    report.skip("broken symlinks" if entry.is_symlink() else "unreadable entries", full, warn=True,
                                detail=exc.strerror or str(exc))
            continue
        if stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key in seen_dirs:
                if entry.is_symlink():
                    report.skip("symlinked folders already listed", full)
                continue
            seen_dirs.add(key)
            try:
                sub = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            except OSError as exc:
                report.skip(_reason(exc, "folders that could not be read"), full, warn=True, detail=exc.strerror or str(exc))
                continue
            try:
                yield from _walk_dir(sub, full, exts, seen_dirs, seen_files, report)
            finally:
                os.close(sub)
        elif entry.name.lower().endswith(exts):
            if not stat.S_ISREG(st.st_mode):
                report.skip("not regular files (FIFO, socket, device)", full, warn=True)
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen_files:
                report.skip("duplicates (a symlink or hard link to a listed file)", full)
                log.info("input: %s is the same file as %s; listed once", printable(full), printable(seen_files[key]))
                continue
            seen_files[key] = full
            report.listed += 1
            yield full


def _reason(exc: OSError, default: str) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "folders not readable (permission denied)"
    return default
