"""NVDEC decoding (NVIDIA GPUs) through PyNvVideoCodec's core decoder, a backend of :mod:`pipeline.backends`.

Contract::

    frames = nvdec_frames(source, index, indices, size)   # torch uint8 [F, size, size, 3] on the current CUDA device
    frames = nvdec_frames(..., host=True)                 # numpy uint8 [F, size, size, 3] (backend "nvdec_host")
    rgb = yuv_to_rgb(y, u, v, size, colorspace, full_range)   # any device; NVDEC's frames in device memory

* Packets come from PyAV (the numbering every backend shares), in Annex B for H.264 / HEVC, fed with their pts,
  which the decoded frames carry back (frames are counted when pts are not unique). Only the packets the targets need
  are fed (:mod:`pipeline.nvdec_feed`: from the keyframe before each group of targets until the group is out, less
  the non-reference pictures that are no target; the same frames as feeding every packet), without seeking: faster
  than NVDEC's random access (issue 13).
* NVDEC's native surface (NV12, P016, 4:2:2, 4:4:4) of each target is kept. With ``host=True``, 8-bit 4:2:0
  targets are converted by swscale exactly as the CPU backends convert (:func:`swscale_rgb`). Otherwise all go
  through :func:`yuv_to_rgb` at once: planes resized
  (bilinear, antialiased), then RGB with the stream's matrix and range as swscale does for PyAV (BT.709, BT.2020,
  SMPTE 240M or FCC when tagged, else BT.601; limited range unless tagged full); rotation applied on the GPU too.
* :class:`pipeline.media.CannotOpen` (the next backend takes the video) without PyNvVideoCodec or a GPU, for a codec
  NVDEC lacks, or a stream it refuses (a profile, or a size below its minimum: 64 x 48 HEVC and VP9 on an H200).

Needs the ``pynvvideocodec`` wheel and the driver's ``libnvcuvid``; tests that use them are marked ``gpu``.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

from pipeline.media import CannotOpen, VideoError, VideoIndex, clean_message, pyav_rgb
from pipeline.nvdec_feed import feed_packets, restart_points

#: PyAV's codec names -> ``PyNvVideoCodec.cudaVideoCodec`` members
NVDEC_CODECS = {"h264": "H264", "hevc": "HEVC", "av1": "AV1", "vp9": "VP9", "vp8": "VP8", "mpeg2video": "MPEG2",
                "mpeg1video": "MPEG1", "mpeg4": "MPEG4", "mjpeg": "JPEG", "vc1": "VC1"}
#: AVColorSpace -> (Kr, Kb): BT.709, FCC, SMPTE 240M, BT.2020 (NCL and CL); anything else is BT.601 (swscale's rule)
_KR_KB = {1: (0.2126, 0.0722), 4: (0.30, 0.11), 7: (0.212, 0.087), 9: (0.2627, 0.0593), 10: (0.2627, 0.0593)}


@functools.cache
def available() -> bool:
    """PyNvVideoCodec imports and torch sees a CUDA GPU."""
    try:
        import PyNvVideoCodec  # noqa: F401
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def yuv_to_rgb(y, u, v, size: int, colorspace: int = 2, full_range: bool = False):
    """Planes (``[H, W]`` luma, ``[h, w]`` chroma, or a batch of frames ``[F, H, W]`` / ``[F, h, w]``; 8-bit values as
    float or uint8) -> ``uint8 [size, size, 3]`` RGB (``[F, size, size, 3]`` for a batch)."""
    import torch
    from torch.nn.functional import interpolate

    if y.dim() == 2:
        return yuv_to_rgb(y[None], u[None], v[None], size, colorspace, full_range)[0]
    kr, kb = _KR_KB.get(int(colorspace), (0.299, 0.114))
    luma = interpolate(y[:, None].float(), size=(size, size), mode="bilinear", antialias=True)[:, 0]
    cb, cr = interpolate(torch.stack([u, v], 1).float(), size=(size, size), mode="bilinear", antialias=True).unbind(1)
    luma, scale = (luma / 255, 255.0) if full_range else ((luma - 16) / 219, 224.0)
    cb, cr = (cb - 128) / scale, (cr - 128) / scale
    r, b = luma + 2 * (1 - kr) * cr, luma + 2 * (1 - kb) * cb
    g = (luma - kr * r - kb * b) / (1 - kr - kb)
    return (torch.stack([r, g, b], -1) * 255).round_().clamp_(0, 255).to(torch.uint8)


def _to_rgb(planes: list[tuple], size: int, index: VideoIndex, turns: int):
    """The targets' planes -> ``uint8 [F, size, size, 3]``, converted together (a few kernels per video, not per
    frame: fewer launches, and fewer switches of the GPU to this CUDA context from another process's); frames of
    another size (a stream that changes resolution) are converted apart."""
    import torch

    shapes = [tuple(t.shape for t in p) for p in planes]
    if len(set(shapes)) == 1:
        rgb = yuv_to_rgb(*(torch.stack(c) for c in zip(*planes)), size, index.colorspace, index.full_range)
    else:
        rgb = torch.stack([yuv_to_rgb(*p, size, index.colorspace, index.full_range) for p in planes])
    return torch.rot90(rgb, turns, dims=(1, 2)) if turns else rgb


def _planes(surface, fmt: str):
    """An NVDEC surface as ``(y, u, v)`` in 8-bit units. ``fmt``: its ``Pixel_Format`` name; NV12 / P016 hold luma
    rows then interleaved chroma rows at half height (NV16 / P216: full height), YUV444 three planes; 16-bit
    surfaces hold their samples in the high bits."""
    t = surface.squeeze()  # [rows, width] (some releases add a unit axis), or [3, H, W] / [H, W, 3] planes
    x = t if t.dtype.itemsize == 1 else t.float() / 256
    if x.dim() == 3:
        return tuple(x) if x.shape[0] == 3 else tuple(x.permute(2, 0, 1))
    rows, width = x.shape
    if "444" in fmt:
        h = rows // 3
        return x[:h], x[h : 2 * h], x[2 * h : 3 * h]
    h = rows // 2 if "NV16" in fmt or "P216" in fmt else rows * 2 // 3
    uv = x[h:].reshape(rows - h, width // 2, 2)
    return x[:h], uv[..., 0], uv[..., 1]


def open_decoder(codec: str):
    """``(PyNvVideoCodec, torch, decoder)``: an NVDEC decoder for PyAV's ``codec`` name, its frames in device memory
    (on the current CUDA device and stream); :class:`CannotOpen` when there is none."""
    try:
        import PyNvVideoCodec as nvc
        import torch
    except ImportError as exc:
        raise CannotOpen(f"PyNvVideoCodec is not installed ({exc})") from exc
    if not torch.cuda.is_available():
        raise CannotOpen("no CUDA GPU")
    member = NVDEC_CODECS.get(codec)
    if member is None:
        raise CannotOpen(f"NVDEC has no {codec} decoder", no_decoder=True)
    try:
        decoder = nvc.CreateDecoder(gpuid=torch.cuda.current_device(), codec=getattr(nvc.cudaVideoCodec, member),
                                    cudacontext=0, cudastream=torch.cuda.current_stream().cuda_stream,
                                    usedevicememory=True, outputColorType=nvc.OutputColorType.NATIVE)
    except Exception as exc:  # PyNvVCException* (their names differ between releases)
        raise CannotOpen(f"NVDEC decoder not created: {clean_message(str(exc))}") from exc
    return nvc, torch, decoder


def _prepass(source, index: VideoIndex):
    """``(turns, restarts, first)``: quarter turns of the display matrix, the stream's restart points
    (:func:`pipeline.nvdec_feed.restart_points`) and the first frame, decoded on the CPU (PyAV), read in a container
    of their own (seeking back is not always possible)."""
    import av

    turns, first = 0, None
    with av.open(source, mode="r") as container:
        for first in container.decode(container.streams[index.stream_index]):
            turns = int(round((first.rotation or 0) / 90)) % 4
            break
        restarts = restart_points(container, index) if index.pts_unique else None
    if hasattr(source, "seek"):
        source.seek(0)
    return turns, restarts, first


def swscale_rgb(planes: list[tuple], template, size: int) -> np.ndarray | None:
    """Host planes (8-bit 4:2:0) of a video's targets -> ``uint8 [F, size, size, 3]`` exactly as the CPU backends
    convert (:func:`pipeline.media.pyav_rgb`): each target's samples are written into ``template`` (a frame
    PyAV decoded from the same stream, so its colour tags, range and chroma siting are the stream's) and go through
    the same swscale call. H.264, HEVC, VP9 and AV1 decoding is bit-exact by their standards, so NVDEC's samples
    are the CPU decoder's and so are the pixels. None when a surface does not fit that (another sample format or
    bit depth, a size other than the template's): the caller converts with :func:`yuv_to_rgb` instead."""
    if template is None or template.format.name not in ("yuv420p", "yuvj420p"):
        return None
    template.make_writable()
    out = []
    for frame_planes in planes:
        for plane, data in zip(template.planes, frame_planes):
            data = np.asarray(data)
            if data.dtype != np.uint8 or data.shape[0] < plane.height or data.shape[1] < plane.width:
                return None
            rows = np.zeros((plane.height, plane.line_size), np.uint8)
            rows[:, : plane.width] = data[: plane.height, : plane.width]  # coded size cropped to the display size
            plane.update(rows)
        out.append(pyav_rgb(template, size))
    return np.stack(out)


def nvdec_frames(source, index: VideoIndex, indices: np.ndarray, size: int, num_threads: int = 1,
                 stats: dict | None = None, host: bool = False):
    """``uint8 [F, size, size, 3]`` on the current CUDA device; see the module docstring. ``stats``, if given, gets
    ``packets_fed`` (to NVDEC) and ``packets`` (in the stream). NVDEC always decodes into device memory; each target's
    surface is kept (one device copy: the decoder reuses its surfaces). ``host=True``: the targets' surfaces come to
    host memory in one transfer and are converted on the CPU by :func:`swscale_rgb` (the CPU backends' pixels) where
    the surface allows; the result is a host array (``nvdec_host``, the actor's NVDEC processes:
    :mod:`pipeline.actor_decode`). Copying every decoded frame to host memory instead (NVDEC's host-memory mode,
    606 copies per video of 60 s 720p with a keyframe every 2 s, against one) gave 2.2 videos/s with 7 session
    processes beside a GPU-bound thread, against 3.2 this way (whole benchmark runs, start-up included:
    ``bench/README.md``)."""
    nvc, torch, decoder = open_decoder(index.codec)
    targets = set(int(i) for i in indices)
    got: dict[int, tuple] = {}
    turns, restarts, first = _prepass(source, index)
    counter = 0

    def take(frames) -> None:
        nonlocal counter
        for frame in frames:
            p = index.position(frame.getPTS()) if index.pts_unique else counter
            counter += 1
            if p in targets and p not in got:  # the decoder reuses its surfaces: keep a copy
                got[p] = (torch.from_dlpack(frame).clone(), str(getattr(frame, "format", "NV12")))

    packets = feed_packets(source, index, indices, got, restarts, stats)
    try:
        for data, pts in packets:
            buf = ctypes.create_string_buffer(data, len(data))  # alive until Decode returns (the parser copies it)
            packet = nvc.PacketData()
            packet.bsl_data, packet.bsl, packet.pts = ctypes.addressof(buf), len(data), int(pts or 0)
            take(decoder.Decode(packet))
            if len(got) == len(targets):
                break
        else:
            while flushed := list(decoder.Decode(nvc.PacketData())):  # end of stream: the frames NVDEC still holds
                take(flushed)
    except Exception as exc:  # PyNvVCException / av.error.FFmpegError while decoding
        if counter == 0 and "CreateDecoder" in str(exc):  # refused at the first sequence header: a CPU backend takes it
            raise CannotOpen(f"NVDEC cannot decode this stream: {clean_message(str(exc))}") from exc
        raise VideoError("corrupt_video", f"NVDEC decoding failed after {len(got)} targets: "
                         f"{clean_message(str(exc))}") from exc
    finally:
        packets.close()  # its container too
    missing = sorted(targets - set(got))
    if missing:
        raise VideoError("corrupt_video", f"the stream ends before frame {missing[0]} of {index.n} (NVDEC)")
    surfaces = [got[int(i)] for i in indices]
    if not host:
        return _to_rgb([_planes(t, fmt) for t, fmt in surfaces], size, index, turns)
    on_host = _to_host([t for t, _ in surfaces])
    planes = [_planes(t, fmt) for t, (_, fmt) in zip(on_host, surfaces)]
    rgb = swscale_rgb(planes, first, size)
    return rgb if rgb is not None else _to_rgb(planes, size, index, turns).numpy()


def _to_host(surfaces: list) -> list:
    """Device tensors -> host tensors, in one transfer when they share a shape (one wait for the GPU per video)."""
    import torch

    if len({tuple(t.shape) for t in surfaces}) == 1:
        return list(torch.stack(surfaces).cpu())
    return [t.cpu() for t in surfaces]
