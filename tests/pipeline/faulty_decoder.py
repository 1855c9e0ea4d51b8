"""A decoder that really crashes or hangs, for the isolation tests (the ``decoder`` argument of
:class:`pipeline.decode.DecodeStage`).

``decode(source, cfg, uri, head)`` has :func:`pipeline.frames.decode_video`'s signature and delegates to it,
except when the video's URI contains a marker:

* ``SEGFAULT``: reads address 0 (a real SIGSEGV, as a broken ffmpeg build would);
* ``ABORT``: ``os.abort()`` (SIGABRT);
* ``EXIT3``: ``os._exit(3)``;
* ``HANG``: sleeps forever;
* ``NOISY``: writes junk to fd 1 and ``print()``s (must not corrupt the worker protocol), then decodes;
* ``PIDS``: leaves a file named after this process's pid next to the URI's path and sleeps 0.5 s, then decodes
  (which processes decoded what).

Core dumps are switched off before crashing, so no core file is left behind.
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys
import time
from pathlib import Path

from pipeline.frames import Decoded, decode_video


def _no_core() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def decode(source, cfg, uri: str = "<bytes>", head: bytes = b"") -> Decoded:
    if "SEGFAULT" in uri:
        _no_core()
        ctypes.string_at(0)
    if "ABORT" in uri:
        _no_core()
        os.abort()
    if "EXIT3" in uri:
        os._exit(3)
    if "HANG" in uri:
        while True:
            time.sleep(3600)
    if "NOISY" in uri:
        os.write(1, b"\x00\x00\x00\x00\x00\x00\x00\x10 junk from C code on fd 1\n")
        print("a stray print from the decoder")
        sys.stdout.flush()
    if "PIDS" in uri:
        (Path(uri).parent / f"pid-{os.getpid()}-{Path(uri).name}").touch()
        time.sleep(0.5)
    return decode_video(source, cfg, uri, head)
