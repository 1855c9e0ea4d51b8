"""Real-world oddities for the bad-input corpus (issue 14), generated with PyAV and byte surgery.

Each maker returns the file's bytes; :func:`oddity_set` returns ``{file name: (bytes, expectation)}`` like
:func:`tests.pipeline.badinputs.bad_input_set` (which includes it). What each one stands for:

* ``av1.mp4``: an AV1 video (phones and browsers record it); decord's FFmpeg has no AV1 decoder.
* ``unknown_codec.mp4``: a video track whose codec FFmpeg does not know (a proprietary camera codec),
  made by renaming the sample entry ``avc1`` to ``xvc1``.
* ``audio_cover_art.m4a.mp4``, ``song_with_cover.mp3``: music with an attached picture (cover art, in MP4 and as
  an ID3 tag): no video stream.
* ``mediarecorder_live.webm``: VP8 WebM written to a non-seekable sink with ``live=1`` (what a browser's
  MediaRecorder writes): no duration, no cues (index).
* ``zero_samples.mp4``: a video track with zero samples (a recorder stopped before its first frame).
* ``one_frame.mkv``: a single-frame Matroska file.
* ``vfr_gaps.mkv``: variable frame rate with long gaps (a motion-triggered camera): 10 frames over 1200 s.
* ``broadcast_capture.ts``: MPEG-2 video in MPEG-TS whose clock starts at 10 s (a tuner capture).
* ``preallocated_tail.mp4``: a faststart MP4 whose last 40 % are zero bytes (a download client preallocated
  the file and stopped).
* ``screen_recording_444.mkv``: H.264 4:4:4 at an odd size (66x38), as screen recorders write.
* ``phone_hevc_main10.mp4``: HEVC Main10 (10-bit) with a 90-degree rotation, as phones record.
* ``camera_mjpeg.avi``: Motion-JPEG in AVI (webcams, old cameras), full-range 4:2:2.
* ``browser_vp9.webm``: a regular VP9 WebM.
"""

from __future__ import annotations

import io
import struct
from fractions import Fraction

import av
import numpy as np

from pipeline.samples import frame_image, make_video

VFR_GAP_PTS = [0, 40, 80, 120, 160, 200_000, 200_040, 1_200_000, 1_200_040, 1_200_080]  # ms
TS_START_S = 10.0


def encode(fmt: str, codec: str, n: int, *, width: int = 64, height: int = 48, fps: int = 24, pix_fmt: str = "yuv420p",
           pts: list[int] | None = None, time_base: Fraction | None = None, container_options: dict | None = None,
           codec_options: dict | None = None, sink=None, rotation: float | None = None) -> bytes:
    """``n`` synthetic frames through ``codec`` into ``fmt``; returns the bytes (or writes to ``sink``)."""
    buf = sink if sink is not None else io.BytesIO()
    with av.open(buf, "w", format=fmt, options=container_options or {}) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = codec_options or {}
        if time_base is not None:
            stream.time_base = stream.codec_context.time_base = time_base
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(frame_image(i, width, height), format="rgb24").reformat(format=pix_fmt)
            if pts is not None:
                frame.pts, frame.time_base = pts[i], time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return b"" if sink is not None else buf.getvalue()


class _NonSeekable(io.RawIOBase):
    """A write-only, non-seekable sink (a socket, a pipe, a browser's Blob stream)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, b) -> int:
        self.data += b
        return len(b)


def make_live_webm() -> bytes:
    sink = _NonSeekable()
    encode("webm", "libvpx", 20, sink=sink, container_options={"live": "1"})
    return bytes(sink.data)


# ------------------------------------------------------------------------------------------------ MP4 surgery

_CONTAINER_BOXES = {b"moov", b"trak", b"mdia", b"minf", b"stbl"}


def _boxes(data, start: int, end: int):
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        header = 8
        if size == 1:
            size, header = struct.unpack(">Q", data[pos + 8 : pos + 16])[0], 16
        elif size == 0:
            size = end - pos
        yield kind, pos, header, size
        pos += size


def _find(data, path: list[bytes], start: int = 0, end: int | None = None) -> list[tuple[int, int, int]]:
    end = len(data) if end is None else end
    found = []
    for kind, pos, header, size in _boxes(data, start, end):
        if kind == path[0]:
            found += [(pos, header, size)] if len(path) == 1 else _find(data, path[1:], pos + header, pos + size)
    return found


def _video_trak(data) -> tuple[int, int]:
    for pos, _header, size in _find(data, [b"moov", b"trak"]):
        (hdlr, _, _), = _find(data, [b"mdia", b"hdlr"], pos + 8, pos + size)
        if data[hdlr + 16 : hdlr + 20] == b"vide":
            return pos, size
    raise ValueError("no video track")


def empty_video_track(data: bytes) -> bytes:
    """The MP4 with its video track's sample tables emptied (entry counts 0): a track with zero samples."""
    b = bytearray(data)
    pos, size = _video_trak(b)
    for name, count_at in ((b"stts", 4), (b"stss", 4), (b"stsc", 4), (b"stco", 4), (b"ctts", 4), (b"stsz", 8)):
        for p, h, _s in _find(b, [b"mdia", b"minf", b"stbl", name], pos + 8, pos + size):
            b[p + h + count_at : p + h + count_at + 4] = b"\0\0\0\0"
    return bytes(b)


def rename_codec(data: bytes, old: bytes = b"avc1", new: bytes = b"xvc1") -> bytes:
    """The MP4 with its video sample entry's fourcc renamed (a codec FFmpeg does not know)."""
    b = bytearray(data)
    pos, size = _video_trak(b)
    (stsd, header, stsd_size), = _find(b, [b"mdia", b"minf", b"stbl", b"stsd"], pos + 8, pos + size)
    at = b.find(old, stsd, stsd + stsd_size)
    assert at > 0
    b[at : at + 4] = new
    return bytes(b)


def make_audio_with_cover_art(fmt: str = "mp4", codec: str = "aac", rate: int = 8000, samples: int = 1024) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        audio = out.add_stream(codec, rate=rate)
        cover = out.add_stream("mjpeg", rate=1)
        cover.width, cover.height, cover.pix_fmt = 64, 64, "yuvj420p"
        cover.disposition = av.stream.Disposition.attached_pic
        out.start_encoding()
        picture = av.VideoFrame.from_ndarray(frame_image(0, 64, 64), format="rgb24").reformat(format="yuvj420p")
        for packet in cover.encode(picture) + cover.encode():
            out.mux(packet)
        tone = (0.2 * np.sin(np.arange(samples, dtype=np.float32) / 3))[None, :]
        for k in range(8):
            frame = av.AudioFrame.from_ndarray(tone.copy(), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, k * samples
            for packet in audio.encode(frame):
                out.mux(packet)
        for packet in audio.encode():
            out.mux(packet)
    return buf.getvalue()


def zero_tail(data: bytes, fraction: float = 0.4) -> bytes:
    keep = int(len(data) * (1 - fraction))
    return data[:keep] + bytes(len(data) - keep)


def oddity_set() -> dict[str, tuple[bytes, str]]:
    from tests.pipeline.badinputs import make_muxed  # (badinputs includes this set)

    faststart_path_free = make_video(num_frames=40)
    ms = Fraction(1, 1000)
    return {
        "av1.mp4": (encode("mp4", "libsvtav1", 12, width=64, height=64, codec_options={"preset": "12"}), "ok"),
        "unknown_codec.mp4": (rename_codec(faststart_path_free), "unsupported_codec"),
        "audio_cover_art.m4a.mp4": (make_audio_with_cover_art(), "no_video_stream"),
        "song_with_cover.mp3": (make_audio_with_cover_art("mp3", "libmp3lame", 22050, 1152), "no_video_stream"),
        "mediarecorder_live.webm": (make_live_webm(), "ok"),
        "zero_samples.mp4": (empty_video_track(make_video(num_frames=5)), "too_few_frames"),
        "one_frame.mkv": (encode("matroska", "libx264", 1), "ok"),
        "vfr_gaps.mkv": (encode("matroska", "libx264", len(VFR_GAP_PTS), pts=VFR_GAP_PTS, time_base=ms), "ok"),
        "broadcast_capture.ts": (encode("mpegts", "mpeg2video", 24, container_options={"output_ts_offset": str(TS_START_S)}), "ok"),
        "preallocated_tail.mp4": (zero_tail(make_muxed(num_frames=40, container_options={"movflags": "faststart"})),
                                  "corrupt_video"),
        "screen_recording_444.mkv": (encode("matroska", "libx264", 8, width=66, height=38, pix_fmt="yuv444p"), "ok"),
        "phone_hevc_main10.mp4": (encode("mp4", "libx265", 6, pix_fmt="yuv420p10le", rotation=90,
                                         codec_options={"preset": "ultrafast", "x265-params": "log-level=error"}), "ok"),
        "camera_mjpeg.avi": (encode("avi", "mjpeg", 8, pix_fmt="yuvj422p"), "ok"),
        "browser_vp9.webm": (encode("webm", "libvpx-vp9", 8, codec_options={"deadline": "realtime", "cpu-used": "8"}), "ok"),
    }
