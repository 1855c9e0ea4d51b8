"""NVDEC decoding (NVIDIA GPUs) through PyNvVideoCodec's core decoder, as a backend of :mod:`pipeline.backends`.

Contract::

    frames = nvdec_frames_gpu(source, index, indices, size, device=0)   # torch uint8 [F, size, size, 3] on the GPU
    frames = nvdec_frames(source, index, indices, size)                 # the same as numpy (a decode_frames backend)

* Packets come from PyAV (the same stream and frame numbering as every backend: :class:`pipeline.media.VideoIndex`);
  H.264 / HEVC packets are converted to Annex B by FFmpeg's bitstream filter, then fed to ``CreateDecoder`` with
  their pts. Decoded frames carry that pts back, so a frame is identified by its pts exactly as in the PyAV backend
  (streams without usable pts are counted instead).
* Every packet up to the last target is decoded, without seeking: NVDEC decodes a 720p stream at about 1,000 frames
  per second per session, and its random-access path (``SimpleDecoder``) was measured slower than decoding
  everything and keeping 32 frames (issue 13). Feeding stops after the last target.
* Colour conversion to RGB is NVDEC's own (``OutputColorType.RGB``); the resize to ``size`` runs on the GPU
  (``torch.nn.functional.interpolate``, bilinear, antialiased), and a display-matrix rotation is applied there too.
* :class:`pipeline.media.CannotOpen` (so the next backend takes the video) when PyNvVideoCodec or a GPU is
  missing, NVDEC has no decoder for the codec, or the decoder cannot be created (e.g. a profile NVDEC lacks, or a
  frame below its minimum size: measured on an H200, 64 x 48 HEVC and VP9 test clips are refused).

Needs the ``pynvvideocodec`` wheel and the driver's ``libnvcuvid``; nothing here runs on a machine without them
(the tests that use it are marked ``gpu``).
"""

from __future__ import annotations

import ctypes
import logging

import numpy as np

from pipeline.media import CannotOpen, VideoError, VideoIndex, clean_message

log = logging.getLogger(__name__)

#: PyAV's codec names -> ``PyNvVideoCodec.cudaVideoCodec`` members
NVDEC_CODECS = {"h264": "H264", "hevc": "HEVC", "av1": "AV1", "vp9": "VP9", "vp8": "VP8", "mpeg2video": "MPEG2",
                "mpeg1video": "MPEG1", "mpeg4": "MPEG4", "mjpeg": "JPEG", "vc1": "VC1"}
_ANNEX_B = {"h264": "h264_mp4toannexb", "hevc": "hevc_mp4toannexb"}


def available() -> bool:
    """PyNvVideoCodec imports and torch sees a CUDA GPU."""
    try:
        import PyNvVideoCodec  # noqa: F401
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _open(source, index: VideoIndex, device: int):
    try:
        import PyNvVideoCodec as nvc
        import torch
    except ImportError as exc:
        raise CannotOpen(f"PyNvVideoCodec is not installed ({exc})") from exc
    if not torch.cuda.is_available():
        raise CannotOpen("no CUDA GPU")
    member = NVDEC_CODECS.get(index.codec)
    if member is None:
        raise CannotOpen(f"NVDEC has no {index.codec} decoder", no_decoder=True)
    stream = torch.cuda.current_stream(device)
    try:
        decoder = nvc.CreateDecoder(gpuid=device, codec=getattr(nvc.cudaVideoCodec, member), cudacontext=0,
                                    cudastream=stream.cuda_stream, usedevicememory=True,
                                    outputColorType=nvc.OutputColorType.RGB)
    except Exception as exc:  # PyNvVCException* (their names differ between releases)
        raise CannotOpen(f"NVDEC decoder not created: {clean_message(str(exc))}") from exc
    return nvc, torch, decoder


def _packets(container, stream, codec: str):
    """``(bytes, pts)`` of the stream's packets in decode order, Annex B for H.264 / HEVC."""
    bsf = None
    if codec in _ANNEX_B:
        from av.bitstream import BitStreamFilterContext

        bsf = BitStreamFilterContext(_ANNEX_B[codec], stream)
    for packet in container.demux(stream):
        if packet.size == 0:
            break
        for out in bsf.filter(packet) if bsf is not None else (packet,):
            yield bytes(out), (out.pts if out.pts is not None else out.dts)
    if bsf is not None:
        for out in bsf.filter(None):
            yield bytes(out), (out.pts if out.pts is not None else out.dts)


def _rotation(container, stream) -> int:
    """Quarter turns of the display matrix (read from the first decoded frame, one CPU-decoded keyframe)."""
    for frame in container.decode(stream):
        return int(round((frame.rotation or 0) / 90)) % 4
    return 0


def nvdec_frames_gpu(source, index: VideoIndex, indices: np.ndarray, size: int, device: int = 0):
    """``uint8 [F, size, size, 3]`` on GPU ``device``; see the module docstring."""
    import av

    nvc, torch, decoder = _open(source, index, device)
    targets = set(int(i) for i in indices)
    last = max(targets)
    got: dict[int, object] = {}
    with av.open(source, mode="r") as probe_container:  # its own container: seeking back is not always possible
        turns = _rotation(probe_container, probe_container.streams[index.stream_index])
    if hasattr(source, "seek"):
        source.seek(0)
    container = av.open(source, mode="r")
    counter = 0
    try:
        stream = container.streams[index.stream_index]

        def take(frames) -> None:
            nonlocal counter
            for frame in frames:
                p = index.position(frame.getPTS()) if index.pts_unique else counter
                counter += 1
                if p is not None and p in targets and p not in got:
                    got[p] = _resize(torch, torch.from_dlpack(frame), size, turns)

        for data, pts in _packets(container, stream, index.codec):
            buf = ctypes.create_string_buffer(data, len(data))  # alive until Decode returns (the parser copies it)
            packet = nvc.PacketData()
            packet.bsl_data, packet.bsl, packet.pts = ctypes.addressof(buf), len(data), int(pts or 0)
            take(decoder.Decode(packet))
            if last in got and len(got) == len(targets):
                break
        else:
            while True:  # end of stream: flush the frames NVDEC still holds
                flushed = list(decoder.Decode(nvc.PacketData()))
                if not flushed:
                    break
                take(flushed)
    except CannotOpen:
        raise
    except Exception as exc:  # PyNvVCException / av.error.FFmpegError while decoding
        if counter == 0 and "CreateDecoder" in str(exc):
            # NVDEC creates its decoder at the first sequence header and refuses streams it cannot take (below its
            # minimum size, e.g. 144 x 144 for HEVC and 128 x 128 for VP9 on Hopper; profiles it lacks): a CPU backend takes it
            raise CannotOpen(f"NVDEC cannot decode this stream: {clean_message(str(exc))}") from exc
        raise VideoError("corrupt_video", f"NVDEC decoding failed after {len(got)} targets: "
                         f"{clean_message(str(exc))}") from exc
    finally:
        container.close()
    missing = sorted(targets - set(got))
    if missing:
        raise VideoError("corrupt_video", f"the stream ends before frame {missing[0]} of {index.n} (NVDEC)")
    return torch.stack([got[int(i)] for i in indices])


def _resize(torch, frame, size: int, turns: int):
    """One decoded RGB frame (HWC or CHW uint8 on the GPU) -> ``uint8 [size, size, 3]``."""
    chw = frame if frame.shape[0] == 3 and frame.shape[-1] != 3 else frame.permute(2, 0, 1)
    x = torch.nn.functional.interpolate(chw[None].float(), size=(size, size), mode="bilinear", align_corners=False,
                                        antialias=True)
    hwc = x[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)
    return torch.rot90(hwc, turns, dims=(0, 1)) if turns else hwc.contiguous()


def nvdec_frames(source, index: VideoIndex, indices: np.ndarray, size: int, num_threads: int = 1) -> np.ndarray:
    """:func:`nvdec_frames_gpu` copied to the host (the :func:`pipeline.backends.decode_frames` contract)."""
    return nvdec_frames_gpu(source, index, indices, size).cpu().numpy()
