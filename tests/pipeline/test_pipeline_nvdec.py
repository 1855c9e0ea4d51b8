"""NVDEC's packet feed (issue 13, item 3, :mod:`pipeline.nvdec_feed`): the packets it picks give the same frames as
decoding every packet.

The rule is checked on the CPU with FFmpeg's software decoder, fed the selected packets in decode order exactly as NVDEC
is (no seek, no flush between groups): targets bit-identical to :func:`pipeline.backends.pyav_sequential_frames`, on
the clips of ``test_pipeline_backends`` (B-pyramid, open GOP, HEVC, VP9, MPEG-4) and on 300-frame clips with a
keyframe every 10 frames (H.264 closed and open GOP, HEVC open GOP, VP8, VP9, AV1, MPEG-4), where most GOPs hold no
target and are dropped. On a GPU the same feed drives NVDEC, compared with NVDEC fed every packet.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from pipeline.backends import pyav_sequential_frames
from pipeline.frames import sample_indices
from pipeline.media import VideoIndex, probe, pyav_rgb
from pipeline.nvdec_feed import (
    ANNEX_B,
    PacketSelector,
    _packets,
    feed_packets,
    nal_types,
    nonreference,
    restart_points,
)
from pipeline.samples import frame_image
from tests.pipeline.oddities import encode
from tests.pipeline.test_pipeline_backends import _clips, _nvdec_usable, _shown, _truth
from tests.pipeline.videos import make_video

S = 32
N = 300  # frames of the short-GOP clips (a keyframe every 10)
SHORT_GOP = ["h264_closed_gop10", "h264_open_gop10", "hevc_open_gop10", "hevc_temporal_layers", "vp9_gop10",
             "vp8_gop10", "av1_gop10", "mpeg4_gop10"]
FED_WHOLE = {"h264_open_gop10", "mpeg4_gop10"}  # no restart point after the first keyframe


def _short_gop_clips() -> dict[str, bytes]:
    x264 = "keyint=10:min-keyint=10:scenecut=0:bframes=3:b-pyramid=normal"
    x265 = "keyint=10:min-keyint=10:scenecut=0:bframes=3:log-level=error"
    vpx = {"deadline": "realtime", "cpu-used": "8", "g": "10"}
    return {
        "h264_closed_gop10": make_video(num_frames=N, width=128, height=96,
                                        options={"preset": "veryfast", "x264-params": x264}),
        "h264_open_gop10": make_video(num_frames=N, width=128, height=96,
                                      options={"preset": "veryfast", "x264-params": x264 + ":open-gop=1"}),
        "hevc_open_gop10": encode("mp4", "libx265", N, width=128, height=96,
                                  codec_options={"preset": "ultrafast", "x265-params": x265 + ":open-gop=1"}),
        "hevc_temporal_layers": encode("mp4", "libx265", N, width=128, height=96, codec_options={  # _N on 3 layers
            "preset": "ultrafast", "x265-params": x265 + ":b-pyramid=1:temporal-layers=3"}),
        "vp9_gop10": encode("webm", "libvpx-vp9", N, width=128, height=96, codec_options=vpx),
        "vp8_gop10": encode("webm", "libvpx", N, width=128, height=96, codec_options={**vpx, "keyint_min": "10"}),
        "av1_gop10": encode("mp4", "libsvtav1", N, width=128, height=96,
                            codec_options={"preset": "12", "g": "10", "crf": "5"}),
        "mpeg4_gop10": make_video(num_frames=N, width=128, height=96, codec="mpeg4", gop=10),
    }


@pytest.fixture(scope="module")
def clips():
    return _clips()


@pytest.fixture(scope="module")
def short_gop():
    return _short_gop_clips()


def decode_fed(data: bytes, index, indices: np.ndarray, size: int = S) -> tuple[np.ndarray, dict]:
    """The targets decoded by FFmpeg from exactly the bytes NVDEC is fed (:func:`feed_packets`: Annex B, decode order,
    no seek, no flush until the stream ends), frames identified by pts; and the feed's counts."""
    import av

    # H.264 / HEVC: a fresh decoder gets the Annex B bytes. Other codecs' bytes are the container's packets, whose
    # headers may live in the container (NVDEC gets none: not what this tests): the container's own packets with
    # those bytes are decoded with the stream's context (FFmpeg's MPEG-4 decoder gives other pixels for bare bytes)
    container = av.open(io.BytesIO(data))
    stream = container.streams[index.stream_index]
    annex_b = index.codec in ANNEX_B
    ctx = av.CodecContext.create(index.codec, "r") if annex_b else stream.codec_context
    originals = (packet for packet in container.demux(stream) if packet.size)
    targets = set(int(t) for t in indices)
    got: dict[int, np.ndarray] = {}
    stats: dict = {}

    def take(frames) -> None:
        for frame in frames:
            p = index.position(frame.pts)
            if p in targets and p not in got:
                got[p] = pyav_rgb(frame, size)

    with contextlib.closing(feed_packets(io.BytesIO(data), index, indices, got, stats=stats)) as packets:
        for payload, pts in packets:
            if annex_b:
                packet = av.Packet(payload)
                packet.pts = pts
            else:
                packet = next(p for p in originals if p.pts == pts)
                assert bytes(packet) == payload
            take(ctx.decode(packet))
            if len(got) == len(targets):
                break
        else:
            take(ctx.decode(None))
    container.close()
    assert set(got) == targets, sorted(targets - set(got))
    return np.stack([got[int(i)] for i in indices]), stats


def _check(data: bytes, indices=None, num_frames: int = 8):
    """Fed decode == sequential reference (bit-identical) and the right frames; returns the feed's counts."""
    index = probe(io.BytesIO(data))
    assert index.pts_unique
    indices = sample_indices(index.n, num_frames) if indices is None else np.asarray(indices)
    reference = pyav_sequential_frames(io.BytesIO(data), index, indices, S)
    frames, stats = decode_fed(data, index, indices)
    assert np.array_equal(frames, reference)
    assert _shown(frames, _truth(index.n)) == indices.tolist()
    return stats


def _restarts(data: bytes, index) -> np.ndarray:
    import av

    with av.open(io.BytesIO(data)) as container:
        return restart_points(container, index)


def _nonreference_positions(data: bytes, index) -> set[int]:
    import av

    top = [-1]
    with av.open(io.BytesIO(data)) as c:
        return {index.position(pts) for payload, pts in _packets(c, c.streams.video[0], index.codec)
                if index.codec in ANNEX_B and nonreference(payload, index.codec, top)}


def _around_keyframes(index) -> np.ndarray:
    """Targets beside every third keyframe k: k - 1 (an open GOP's leading picture, decoded after k), k, k + 1."""
    keys = index.keyframes[1::3]
    return np.unique(np.concatenate([keys - 1, keys, keys + 1, [index.n - 1]]).clip(0, index.n - 1))


@pytest.mark.parametrize("name", ["h264_bframes_gop12", "h264_open_gop", "hevc_gop12", "vp9", "mpeg4"])
@pytest.mark.parametrize("num_frames", [8, 32, 77])
def test_selected_packets_give_the_sequential_frames(clips, name, num_frames):
    _check(clips[name], num_frames=num_frames)


@pytest.mark.parametrize("name", SHORT_GOP)
def test_short_gops_are_skipped_with_the_same_frames(short_gop, name):
    """8 targets over 30 GOPs: most GOPs are dropped, except on open-GOP H.264 (its only IDR picture is the first) and
    MPEG-4 Part 2 (no restart points), fed whole up to the last target but for H.264's non-reference pictures;
    targets beside keyframes (an open GOP's leading pictures among them); every frame a target: every packet fed."""
    data = short_gop[name]
    index = probe(io.BytesIO(data))
    assert len(index.keyframes) == N // 10
    restarts = _restarts(data, index)
    want = [0] if name == "h264_open_gop10" else [] if name in FED_WHOLE else index.keyframes.tolist()
    assert restarts.tolist() == want
    stats = _check(data, num_frames=8)
    print(f"FED {name}: {stats['packets_fed']} of {stats['packets']} packets for 8 targets")
    if name in FED_WHOLE:  # no GOP dropped: every packet but the non-reference pictures that are no targets
        nonref = _nonreference_positions(data, index) - set(sample_indices(index.n, 8).tolist())
        assert stats["packets_fed"] == index.n - len(nonref) and (len(nonref) > 0) == (index.codec == "h264")
    else:
        assert stats["packets_fed"] <= 0.5 * index.n, stats
        assert _check(data, indices=_around_keyframes(index))["packets_fed"] < 0.9 * index.n
    assert _check(data, indices=np.arange(index.n)[::-1])["packets_fed"] == index.n  # any order


def test_open_gop_clips_have_leading_pictures(short_gop):
    """The open-GOP clips really have frames shown before a keyframe but decoded after it (what makes a target just
    before a start point need that keyframe's packets), and after the Annex B filter H.264's open-GOP I pictures come
    without an SPS (why the first packet is always fed)."""
    import av

    for name in ("h264_open_gop10", "hevc_open_gop10"):
        index = probe(io.BytesIO(short_gop[name]))
        keys, last_key, leading, sps = set(int(k) for k in index.keyframes), -1, 0, []
        with av.open(io.BytesIO(short_gop[name])) as c:
            for data, pts in _packets(c, c.streams.video[0], index.codec):
                p = index.position(pts)
                if p in keys:
                    last_key = p
                    sps.append((7 if index.codec == "h264" else 33) in nal_types(data, index.codec))
                leading += p < last_key
        assert leading > 0, name
        assert sps[0] and all(sps[1:]) == (index.codec == "hevc") and any(sps[1:]) == (index.codec == "hevc"), name


def test_selector_rule_on_a_known_layout():
    """Keyframes at 0, 10, 20, 30 in a stream without reordering: targets 3 and 25 -> feed 0..3 (the first GOP from
    the start), drop 4..19, feed 20..25; the first packet is fed even when no target needs it."""

    index = VideoIndex(codec="h264", stream_index=0, pts=np.arange(40), keyframes=np.array([0, 10, 20, 30]),
                       timestamps_s=np.arange(40) / 10, duration_s=4.0, fps=10.0)

    def fed(targets) -> list[int]:
        select, got, out = PacketSelector(index, np.array(targets)), set(), []
        for p in range(40):
            if select.wants(p, got):
                out.append(p)
                got.add(p)  # no decoder delay: a frame is out as soon as its packet is in
            if got >= set(targets):
                break
        return out

    assert fed([3, 25]) == [0, 1, 2, 3, 20, 21, 22, 23, 24, 25]
    assert fed([12]) == [0, 10, 11, 12]
    assert fed([9, 10]) == list(range(11))  # straight through a start keyframe while on
    assert fed([35, 31]) == [0, 30, 31, 32, 33, 34, 35]


def test_open_gop_h264_cannot_restart_at_its_i_pictures(short_gop, monkeypatch):
    """Why only IDR keyframes are H.264 restart points: fed after a gap, FFmpeg loses the frames of an open GOP's
    non-IDR I picture (their POC no longer follows what the decoder holds)."""
    from pipeline import nvdec_feed

    data = short_gop["h264_open_gop10"]
    index = probe(io.BytesIO(data))
    monkeypatch.setattr(nvdec_feed, "restart_points", lambda container, index: index.keyframes)
    with pytest.raises(AssertionError):
        _check(data, indices=_around_keyframes(index))


def _nvdec_clip(name: str, short_gop: dict) -> tuple[bytes, np.ndarray]:
    """A short-GOP clip NVDEC takes (HEVC and VP9 at 256 x 192: 128 x 96 is below its minimum) and what its frames
    show (as :func:`_truth`, at its size)."""
    import av

    w, h = (256, 192) if name.endswith("_256") else (128, 96)
    truth = np.stack([av.VideoFrame.from_ndarray(frame_image(i, w, h), format="rgb24").reformat(width=S, height=S)
                      .to_ndarray() for i in range(N)]).astype(np.float32)
    return _nvdec_bytes(name, short_gop), truth


def _nvdec_bytes(name: str, short_gop: dict) -> bytes:
    if name == "hevc_open_gop10_256":
        x265 = "keyint=10:min-keyint=10:scenecut=0:bframes=3:open-gop=1:log-level=error"
        return encode("mp4", "libx265", 150, width=256, height=192,
                      codec_options={"preset": "ultrafast", "x265-params": x265})
    if name == "vp9_gop10_256":
        return encode("webm", "libvpx-vp9", 150, width=256, height=192,
                      codec_options={"deadline": "realtime", "cpu-used": "8", "g": "10"})
    return short_gop[name]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["h264_closed_gop10", "h264_open_gop10", "hevc_open_gop10_256", "vp9_gop10_256"])
def test_nvdec_skips_gops_with_the_frames_of_decoding_everything(short_gop, name, monkeypatch):
    """On NVDEC: the fed packets give the same frames as feeding every packet (bit-identical RGB), the right frames,
    and most GOPs are dropped (open-GOP H.264: only non-reference pictures)."""
    _nvdec_usable()
    import torch

    from pipeline import nvdec_feed
    from pipeline.nvdec import nvdec_frames

    data, truth = _nvdec_clip(name, short_gop)
    index = probe(io.BytesIO(data))
    indices = sample_indices(index.n, 8)
    stats: dict = {}
    frames = nvdec_frames(io.BytesIO(data), index, indices, S, stats=stats)
    print(f"NVDEC_FED {name}: {stats['packets_fed']} of {stats['packets']} packets")
    if name == "h264_open_gop10":  # no GOP dropped, only non-reference pictures
        nonref = _nonreference_positions(data, index) - set(indices.tolist())
        assert 0.5 * index.n < stats["packets_fed"] <= index.n - len(nonref)
    else:
        assert stats["packets_fed"] <= 0.5 * index.n
    assert _shown(frames.cpu().numpy(), truth[: index.n]) == indices.tolist()
    monkeypatch.setattr(PacketSelector, "wants", lambda self, position, received: True)  # feed every packet
    monkeypatch.setattr(nvdec_feed, "nonreference", lambda data, codec, top: False)
    everything: dict = {}
    assert torch.equal(nvdec_frames(io.BytesIO(data), index, indices, S, stats=everything), frames)
    assert everything["packets_fed"] == index.n


def test_nvdec_prepass_reads_the_restart_points_after_the_first_frame(short_gop):
    """What :func:`pipeline.nvdec.nvdec_frames` passes to the feed (read in the container that decoded the first frame
    for its rotation) equals the restart points read in a fresh container."""
    from pipeline.nvdec import _prepass

    for name in ("h264_closed_gop10", "h264_open_gop10", "hevc_open_gop10"):
        data = short_gop[name]
        index = probe(io.BytesIO(data))
        source = io.BytesIO(data)
        turns, restarts, first = _prepass(source, index)
        assert turns == 0 and first.width > 0 and restarts.tolist() == _restarts(data, index).tolist() and source.tell() == 0
