"""The packets NVDEC is fed (:mod:`pipeline.nvdec`): only those the targets need, with the frames of feeding them all.

Contract::

    packets = feed_packets(source, index, indices, received, restarts, stats)   # iterator of (bytes, pts), decode order
    select = PacketSelector(index, indices, restarts); select.wants(position, received) -> bool   # the rule, per packet

* ``received``: the target frame numbers the decoder has returned so far (a dict or set the caller fills while it
  consumes the iterator: when the frames of a group are out, the packets up to the next group are dropped).
* H.264 / HEVC go through FFmpeg's ``*_mp4toannexb`` filter, which sees every packet (it is stateful); dropped packets
  then do not reach the decoder. An HEVC packet fed after dropped ones gets an end-of-sequence NAL unit before it, so
  a CRA keyframe starts a new coded video sequence (POC reset, its RASL pictures not output: they are no targets).
* Non-reference pictures that are not targets are dropped too (H.264 ``nal_ref_idc`` 0; HEVC sub-layer
  non-reference pictures of the highest sub-layer, read from the SPS): no other picture uses them, and neither frame
  numbers nor POCs count them (what FFmpeg's ``skip_frame = NONREF`` does on the CPU path). Only with unique pts.
* Restart points (keyframes at which feeding may resume after a gap): for H.264 the IDR keyframes (a non-IDR I
  picture of an open GOP keeps the POC and reference state of what came before: after a gap FFmpeg drops or misorders
  its frames); for HEVC the IRAP keyframes; for VP8, VP9 and AV1 every keyframe (it refreshes every reference);
  other codecs none, so they are fed whole up to the last target (MPEG-4 Part 2 differed after a gap, measured with
  FFmpeg), as is a stream whose frames cannot be told apart by pts (``not index.pts_unique``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from pipeline.media import VideoIndex

ANNEX_B = {"h264": "h264_mp4toannexb", "hevc": "hevc_mp4toannexb"}
HEVC_EOS = b"\x00\x00\x01\x48\x01"  # end-of-sequence NAL unit (type 36)
#: codecs whose every keyframe is a restart point (checked in tests/pipeline/test_pipeline_nvdec.py) ...
KEYFRAME_RESTARTS = frozenset({"vp8", "vp9", "av1"})
#: ... and those whose keyframes are when they hold these NAL units: H.264 IDR, HEVC IRAP (BLA, IDR, CRA)
RESTART_NALS = {"h264": {5}, "hevc": {16, 17, 18, 19, 20, 21}}


class PacketSelector:
    """Which packets, in decode order, a decoder must be fed for the targets to come out exactly as when it is fed
    every packet: the rule of :func:`pipeline.backends.pyav_frames` (decode from the keyframe before each group of
    targets), without seeking or flushing. Needs ``index.pts_unique``.

    ``wants(position, received)`` is asked once per packet in decode order: ``position`` is its frame number
    (``index.position(pts)``, None if unknown), ``received`` the target frame numbers the decoder returned so far.
    ``restarts``: the keyframe positions at which decoding may resume after a gap (default: every keyframe).

    * start points: for each target ``t`` the last restart point at or before ``t`` (presentation order); a target
      before the second restart point is fed from the first packet;
    * feeding switches on at a start point's keyframe packet (or the first packet) and stays on, straight through
      other keyframes, until every target before the next start point has been received (frames come out in display
      order, some packets after their own); then packets are dropped until the next start point's keyframe packet;
    * the first packet is always fed: it carries what later keyframes may lack (after ``h264_mp4toannexb`` only IDR
      pictures are preceded by the SPS / PPS).

    Exact: each target is decoded from its start point's keyframe with every later packet until it is out. Frames
    that are not targets may come out broken (the leading pictures of an open-GOP keyframe fed after a gap); they lie
    before that start point, where every target was received before the gap. ``packets`` / ``fed``: packets asked
    about / fed so far.
    """

    def __init__(self, index: VideoIndex, indices: np.ndarray, restarts: np.ndarray | None = None):
        keys = np.asarray(index.keyframes if restarts is None else restarts, dtype=np.int64)
        self.targets = np.unique(np.asarray(indices, dtype=np.int64))
        j = np.searchsorted(keys, self.targets, side="right") - 1
        self.starts = np.unique(np.where(j > 0, keys[np.clip(j, 0, None)], -1) if keys.size else [-1])  # -1: 1st packet
        self._starts = set(int(k) for k in self.starts)
        self.on, self.start = False, -1  # feeding; the last start point fed
        self.done = self.need = 0  # targets[:done] received; targets[:need] lie before the start point after ``start``
        self.packets = self.fed = 0

    def _switch_on(self, start: int) -> None:
        self.on, self.start = True, max(self.start, start)
        k = int(np.searchsorted(self.starts, self.start, side="right"))
        self.need = int(np.searchsorted(self.targets, self.starts[k])) if k < len(self.starts) else len(self.targets)

    def wants(self, position: int | None, received) -> bool:
        """Whether to feed this packet (see the class docstring)."""
        first = self.packets == 0
        self.packets += 1
        if self.on:
            while self.done < len(self.targets) and int(self.targets[self.done]) in received:
                self.done += 1
            self.on = self.done < self.need
        if first and self.starts[0] == -1:
            self._switch_on(-1)
        elif position in self._starts:
            self._switch_on(position)
        feed = self.on or first
        self.fed += feed
        return feed


def _packets(container, stream, codec: str) -> Iterator[tuple[bytes, int | None]]:
    """``(bytes, pts)`` of the stream's packets in decode order, Annex B for H.264 / HEVC."""
    bsf = None
    if codec in ANNEX_B:
        from av.bitstream import BitStreamFilterContext

        bsf = BitStreamFilterContext(ANNEX_B[codec], stream)
    for packet in container.demux(stream):
        if packet.size == 0:
            break
        for out in bsf.filter(packet) if bsf is not None else (packet,):
            yield bytes(out), (out.pts if out.pts is not None else out.dts)
    if bsf is not None:
        for out in bsf.filter(None):
            yield bytes(out), (out.pts if out.pts is not None else out.dts)


def nal_types(data: bytes, codec: str) -> set[int]:
    """The NAL unit types of an Annex B H.264 / HEVC packet."""
    types, i = set(), data.find(b"\x00\x00\x01")
    while 0 <= i < len(data) - 3:
        types.add(data[i + 3] & 0x1F if codec == "h264" else (data[i + 3] >> 1) & 0x3F)
        i = data.find(b"\x00\x00\x01", i + 3)
    return types


def nonreference(data: bytes, codec: str, top: list[int]) -> bool:
    """Whether an Annex B H.264 / HEVC packet holds pictures no other picture references: every slice in it has
    ``nal_ref_idc`` 0 (H.264) or is a sub-layer non-reference picture on the highest sub-layer (HEVC; ``top``:
    ``[that sub-layer]``, -1 until an SPS is seen, updated from an SPS in ``data``)."""
    slices, i = 0, data.find(b"\x00\x00\x01")
    while 0 <= i < len(data) - 5:
        b = data[i + 3]
        if codec == "h264" and b & 0x1F in (1, 5):
            if b & 0x1F == 5 or b >> 5:
                return False
            slices += 1
        elif codec == "hevc":
            kind = (b >> 1) & 0x3F
            if kind == 33:  # SPS: sps_max_sub_layers_minus1 follows the VPS id
                top[0] = (data[i + 5] >> 1) & 7
            elif kind < 32:  # a slice: TRAIL_N, TSA_N, STSA_N, RADL_N, RASL_N are the even types below 16
                if kind >= 16 or kind % 2 or (data[i + 4] & 7) - 1 != top[0]:
                    return False
                slices += 1
        i = data.find(b"\x00\x00\x01", i + 3)
    return slices > 0


def restart_points(container, index: VideoIndex) -> np.ndarray:
    """The keyframe positions where feeding may resume after a gap (see the module docstring). For H.264 / HEVC each
    keyframe's packet is read from ``container`` (open on the video; left seeked somewhere), one seek per keyframe:
    a restart point holds an IDR slice (H.264) or an IRAP one (HEVC); a keyframe the seek does not land on is none."""
    if index.codec not in RESTART_NALS:
        return index.keyframes if index.codec in KEYFRAME_RESTARTS else np.zeros(0, dtype=np.int64)
    from av.bitstream import BitStreamFilterContext

    points = []
    stream = container.streams[index.stream_index]
    for k in index.keyframes:
        container.seek(int(index.pts[k]), stream=stream, backward=True, any_frame=False)
        packet = next((p for p in container.demux(stream) if p.size), None)
        if packet is None or index.position(packet.pts) != k:
            continue
        bsf = BitStreamFilterContext(ANNEX_B[index.codec], stream)  # its own: only the slice types are read
        types = set().union(*(nal_types(bytes(out), index.codec) for out in [*bsf.filter(packet), *bsf.filter(None)]))
        if types & RESTART_NALS[index.codec]:
            points.append(int(k))
    return np.asarray(points, dtype=np.int64)


def feed_packets(source, index: VideoIndex, indices: np.ndarray, received, restarts: np.ndarray | None = None,
                 stats: dict | None = None) -> Iterator[tuple[bytes, int | None]]:
    """``(bytes, pts)`` to feed the decoder, in decode order (see the module docstring). ``restarts``: the stream's
    :func:`restart_points` (read here, in a container of their own, if not given). ``stats``, if given, gets
    ``packets_fed`` and ``packets`` (in the stream) when the iterator ends or is closed."""
    import av

    if restarts is None and index.pts_unique:
        with av.open(source, mode="r") as container:
            restarts = restart_points(container, index)
        if hasattr(source, "seek"):
            source.seek(0)
    select = PacketSelector(index, indices, restarts) if index.pts_unique else None
    targets = set(int(i) for i in indices)
    skip_nonref = select is not None and index.codec in ANNEX_B
    fed, gap, top = 0, False, [-1]
    try:
        with av.open(source, mode="r") as container:
            for data, pts in _packets(container, container.streams[index.stream_index], index.codec):
                position = index.position(pts)
                if select is not None and not select.wants(position, received):
                    gap = True
                    continue
                # every packet fed is read (the SPS that sets ``top`` comes first); never the first one
                droppable = skip_nonref and nonreference(data, index.codec, top)
                if droppable and position not in targets and select.packets > 1:
                    continue
                fed += 1
                yield (HEVC_EOS + data if gap and index.codec == "hevc" else data), pts
                gap = False
    finally:
        if stats is not None:
            stats.update(packets_fed=fed, packets=index.n)
