"""Decoder backends behind one function.

Contract::

    frames, backend = decode_frames(source, index, indices, size, backends=("pyav", "decord"), num_threads=1)

* ``index``: the source's :class:`pipeline.media.VideoIndex` (frame ``i`` is the ``i``-th in presentation order);
  ``indices``: ``int [F]`` frame numbers (repeats allowed). Returns ``uint8 [F, size, size, 3]`` RGB, upright
  (numpy, or a CUDA tensor from ``nvdec``), and the backend's name.
* Backends are tried in order, per video: one that cannot OPEN the file (no decoder for the codec, a frame count
  other than the container's) hands over to the next; a failure while reading is the file's (``corrupt_video``).
  None can open it: ``unsupported_codec`` if none has a decoder for the codec, else ``corrupt_video``.

``decord``: ``VideoReader.get_batch`` (the design's named decoder). ``pyav``: per group of targets, seek to the
keyframe before it and decode forward, converting only the targets; for H.264 / HEVC non-reference frames that are
not targets are skipped (``skip_frame = NONREF``, lifted for each target's packet: exact, since no frame depends on
them). Frames are identified by pts, so skipped frames cannot shift the numbering. ``pyav_sequential`` decodes every
frame from the start (the tests' reference).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import numpy as np

from pipeline.media import CannotOpen, VideoError, VideoIndex, clean_message, pyav_rgb

log = logging.getLogger(__name__)

#: decode.backend ``auto``: PyAV first (right frames where decord returns wrong ones: HEVC and open-GOP H.264
#: with B-frames; faster on long-GOP H.264 and HEVC, see bench/bench_decode.py), decord when PyAV cannot open a file
BACKENDS = ("pyav", "decord")
#: codecs whose FFmpeg decoder reads ``skip_frame`` per frame (so it can be lifted for one packet)
SKIP_NONREF_CODECS = frozenset({"h264", "hevc"})


class _SeekMissed(Exception):
    """A seek did not land at or before the frame it aimed for."""


def decode_frames(source, index: VideoIndex, indices: np.ndarray, size: int, uri: str = "<bytes>",
                  backends: Sequence[str] = BACKENDS, num_threads: int = 1) -> tuple[np.ndarray, str]:
    """See the module docstring; raises :class:`VideoError`."""
    reasons: list[tuple[str, CannotOpen]] = []
    for name in backends:
        if hasattr(source, "seek"):
            source.seek(0)
        try:
            frames = backend(name)(source, index, np.asarray(indices), size, num_threads)
        except CannotOpen as exc:
            log.debug("%s: %s cannot open it: %s", uri, name, exc.reason)
            reasons.append((name, exc))
            continue
        if reasons:
            log.info("%s: decoded with %s (%s)", uri, name, "; ".join(f"{n}: {e.reason}" for n, e in reasons))
        return frames, name
    why = "; ".join(f"{n}: {e.reason}" for n, e in reasons)
    if reasons and all(e.no_decoder for _, e in reasons):
        raise VideoError("unsupported_codec", f"{uri}: unsupported codec {index.codec} (no decoder for it: {why})")
    raise VideoError("corrupt_video", f"{uri}: cannot open: {why}")


# ------------------------------------------------------------------------------------------------ decord


def decord_frames(source, index: VideoIndex, indices: np.ndarray, size: int, num_threads: int = 1) -> np.ndarray:
    import decord

    try:
        vr = decord.VideoReader(source, ctx=decord.cpu(0), width=size, height=size, num_threads=num_threads)
    except Exception as exc:  # decord raises RuntimeError / DECORDError with FFmpeg's or its own text
        text = clean_message(str(exc))
        raise CannotOpen(text, no_decoder="cannot find video stream" in text) from exc
    if len(vr) != index.n:  # decord's own index disagrees (it can hang reading past the real end: #373)
        raise CannotOpen(f"counts {len(vr)} frames, the container holds {index.n}")
    try:
        return vr.get_batch(indices).asnumpy()
    except Exception as exc:  # decord errors while reading (broken packets)
        raise VideoError("corrupt_video", f"decoding failed: {clean_message(str(exc))}") from exc


# ------------------------------------------------------------------------------------------------ PyAV


def _open_pyav(source, index: VideoIndex, num_threads: int):
    import av

    try:
        container = av.open(source, mode="r")
    except av.error.FFmpegError as exc:
        raise CannotOpen(clean_message(str(exc))) from exc
    stream = container.streams[index.stream_index]
    ctx = stream.codec_context
    if ctx is None:
        container.close()
        raise CannotOpen(f"no {index.codec} decoder in PyAV's FFmpeg", no_decoder=True)
    ctx.thread_count = num_threads
    if num_threads != 1:
        ctx.thread_type = "AUTO"
    return container, stream


def pyav_sequential_frames(source, index: VideoIndex, indices: np.ndarray, size: int, num_threads: int = 1) -> np.ndarray:
    """Decode every frame from the start, counting them; keep the targets (the reference for the tests)."""
    import av

    container, stream = _open_pyav(source, index, num_threads)
    wanted = set(int(i) for i in indices)
    last = max(wanted)
    got: dict[int, np.ndarray] = {}
    try:
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                got[i] = pyav_rgb(frame, size)
            if i >= last:
                break
    except av.error.FFmpegError as exc:
        raise VideoError("corrupt_video", f"decoding failed after {len(got)} targets: {clean_message(str(exc))}") from exc
    finally:
        container.close()
    return _stack(got, indices, index)


def _stack(got: dict[int, np.ndarray], indices: np.ndarray, index: VideoIndex) -> np.ndarray:
    missing = sorted(set(int(i) for i in indices) - set(got))
    if missing:
        raise VideoError("corrupt_video", f"the stream ends before frame {missing[0]} of {index.n} (decoded "
                         f"{len(got)} of {len(set(int(i) for i in indices))} sampled frames)")
    return np.stack([got[int(i)] for i in indices])


def pyav_frames(source, index: VideoIndex, indices: np.ndarray, size: int, num_threads: int = 1) -> np.ndarray:
    """Seek to the keyframe before each group of targets, decode forward, skip non-reference non-targets."""
    import av

    if not index.pts_unique:  # frames cannot be told apart by pts: count them from the start instead
        return pyav_sequential_frames(source, index, indices, size, num_threads)
    container, stream = _open_pyav(source, index, num_threads)
    ctx = stream.codec_context
    skip = index.codec in SKIP_NONREF_CODECS
    targets = np.unique(np.asarray(indices, dtype=np.int64))
    keys = index.keyframes
    got: dict[int, np.ndarray] = {}
    try:
        t = 0
        while t < len(targets):
            key = int(keys[np.searchsorted(keys, targets[t], side="right") - 1])
            container.seek(int(index.pts[key]), stream=stream, backward=True, any_frame=False)  # flushes the decoder
            t = _decode_group(container, stream, ctx, index, targets, t, size, got, skip)
    except _SeekMissed:
        log.info("seeking in this %s stream is unreliable; decoding it from the start", index.codec)
        if hasattr(source, "seek"):
            source.seek(0)
        return pyav_sequential_frames(source, index, indices, size, num_threads)
    except av.error.FFmpegError as exc:
        raise VideoError("corrupt_video", f"decoding failed after {len(got)} targets: {clean_message(str(exc))}") from exc
    finally:
        container.close()
    return _stack(got, indices, index)


def _decode_group(container, stream, ctx, index: VideoIndex, targets: np.ndarray, t: int, size: int,
                  got: dict[int, np.ndarray], skip: bool) -> int:
    """Decode forward from the current seek point until ``targets[t]`` and every later target before the
    next keyframe that lies after a decoded target are in ``got``; returns the next target to seek for."""
    keys = index.keyframes
    wanted = set(int(x) for x in targets[t:])
    mode = None

    def frames_of(packet):
        nonlocal mode
        if skip and packet is not None:
            p = index.position(packet.pts)
            want = "DEFAULT" if p is None or p in wanted else "NONREF"
            if want != mode:
                ctx.skip_frame = mode = want
        return ctx.decode(packet)

    for packet in container.demux(stream):
        for frame in frames_of(packet if packet.size else None):
            p = index.position(frame.pts)
            if p is None:
                continue
            if p in wanted:
                got[p] = pyav_rgb(frame, size)
            while t < len(targets) and int(targets[t]) in got:
                t += 1
            if t == len(targets):
                return t
            if p > targets[t]:  # the seek landed after the target (a wrong container index)
                raise _SeekMissed
            # the next target lies beyond a keyframe we have not reached: seeking there is cheaper
            next_key = int(keys[np.searchsorted(keys, targets[t], side="right") - 1])
            if next_key > p:
                if skip:
                    ctx.skip_frame = "DEFAULT"
                return t
        if not packet.size:
            break
    if skip:
        ctx.skip_frame = "DEFAULT"
    return len(targets)  # end of stream: whatever is missing is reported by _stack


_BACKENDS = {"decord": decord_frames, "pyav": pyav_frames, "pyav_sequential": pyav_sequential_frames}


def backend(name: str):
    """The frames function of a backend name (``nvdec`` is imported on first use: GPU hosts only)."""
    if name in ("nvdec", "nvdec_host"):  # nvdec_host: a host array of the CPU backends' pixels (not a decode.backend)
        from pipeline.nvdec import nvdec_frames

        return nvdec_frames if name == "nvdec" else functools.partial(nvdec_frames, host=True)
    return _BACKENDS[name]
