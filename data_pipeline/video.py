"""Video clip reading with PyAV: frame selection by fps / max_frames, resize and center crop.

Two passes over the file: a demux pass reads packet timestamps only (no decoding), which gives
the exact frame times, so frame selection is a pure function of those times; the decode pass
then converts only the selected frames. Any failure raises :class:`VideoReadError` with a
``kind`` the sharding job counts (missing_file, unreadable, no_video_stream, no_frames,
decode_error).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from data_pipeline.errors import VideoReadError

_EPS = 1e-6


@dataclass
class DecodedClip:
    frames: np.ndarray          # (T, S, S, 3) uint8 RGB
    timestamps: list[float]     # seconds of each frame from the video's first frame
    native_fps: float           # source frame rate (0.0 if unknown)
    original_size: tuple[int, int]  # (width, height) of the source
    codec: str


def select_frames(times: np.ndarray, start: float | None, end: float | None,
                  fps: float, max_frames: int) -> np.ndarray:
    """Indices of the frames to keep.

    times: (N,) ascending seconds from the first frame (times[0] == 0). The clip is
    ``[start, end)`` (defaults: whole video). ``fps > 0`` samples the frame on screen at
    ``start + k/fps``; ``fps == 0`` keeps every frame of the clip. When that gives more than
    ``max_frames`` frames, ``max_frames`` are taken uniformly (window centres) over the clip.
    Duplicates (fps above the native rate) are dropped. Returns (T,) int64, may be empty.
    """
    n = len(times)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    step = float(np.median(np.diff(times))) if n > 1 else 0.0
    video_end = float(times[-1]) + step
    lo = 0.0 if start is None else float(start)
    hi = video_end if end is None else min(float(end), video_end)
    if n == 1 and lo <= _EPS and (end is None or end > 0):
        return np.zeros(1, dtype=np.int64)  # a still image or 1-frame clip
    if hi - lo <= _EPS:
        return np.zeros(0, dtype=np.int64)

    def on_screen(t: np.ndarray) -> np.ndarray:
        return np.searchsorted(times, t + _EPS, side="right") - 1

    if fps > 0:
        count = max(1, math.ceil((hi - lo) * fps - _EPS))
        if count > max_frames:
            targets = lo + (np.arange(max_frames) + 0.5) * (hi - lo) / max_frames
        else:
            targets = lo + np.arange(count) / fps
        chosen = on_screen(targets)
    else:
        inside = np.nonzero((times >= lo - _EPS) & (times < hi - _EPS))[0]
        if len(inside) == 0 or times[inside[0]] > lo + _EPS:
            first = on_screen(np.array([lo]))
            inside = np.concatenate([first, inside]) if first[0] >= 0 else inside
        if len(inside) > max_frames:
            inside = inside[((np.arange(max_frames) + 0.5) * len(inside) / max_frames).astype(np.int64)]
        chosen = inside
    chosen = chosen[chosen >= 0]
    _, first_pos = np.unique(chosen, return_index=True)
    return chosen[np.sort(first_pos)].astype(np.int64)


def _cover_size(width: int, height: int, size: int) -> tuple[int, int]:
    """Smallest (w, h) with the source aspect ratio covering a size x size square."""
    scale = size / min(width, height)
    return max(size, round(width * scale)), max(size, round(height * scale))


def frame_to_square(frame, size: int) -> np.ndarray:
    """PyAV VideoFrame -> (size, size, 3) uint8 RGB: scale to cover, then center crop.

    swscale does the scaling (area filter when shrinking, bicubic when enlarging)."""
    w, h = _cover_size(frame.width, frame.height, size)
    shrinking = w <= frame.width and h <= frame.height
    rgb = frame.reformat(width=w, height=h, format="rgb24",
                         interpolation="AREA" if shrinking else "BICUBIC").to_ndarray()
    top, left = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(rgb[top:top + size, left:left + size])


def _open(path: str):
    import av

    if not os.path.exists(path):
        raise VideoReadError(f"{path}: file not found", kind="missing_file")
    if os.path.getsize(path) == 0:
        raise VideoReadError(f"{path}: file is empty (0 bytes)", kind="unreadable")
    try:
        container = av.open(path, mode="r")
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise VideoReadError(f"{path}: cannot open as video ({e})", kind="unreadable") from None
    if not container.streams.video:
        container.close()
        raise VideoReadError(f"{path}: has no video stream", kind="no_video_stream")
    return container


def _frame_pts(path: str) -> tuple[np.ndarray, float, float, tuple[int, int], str]:
    """Demux pass: (sorted unique pts, time_base, native fps, (w, h), codec) without decoding."""
    import av

    container = _open(path)
    try:
        stream = container.streams.video[0]
        time_base = float(stream.time_base) if stream.time_base else 0.0
        if stream.codec_context is None:
            raise VideoReadError(f"{path}: its video codec ('{getattr(getattr(stream, 'codec', None), 'name', 'unknown')}') has "
                                 "no decoder in this PyAV/FFmpeg build; transcode the file, e.g. ffmpeg -i IN -c:v "
                                 "libx264 -pix_fmt yuv420p out.mp4", kind="unsupported_codec")
        info = (float(stream.average_rate or 0.0), (stream.codec_context.width, stream.codec_context.height),
                stream.codec_context.name)
        try:
            # Discard-flagged packets (before an mp4 edit list's start) are never output by the decoder.
            pts = [p.pts for p in container.demux(stream) if p.size > 0 and not p.is_discard]
        except av.error.FFmpegError as e:
            raise VideoReadError(f"{path}: demuxing failed ({e}); the file is corrupt or truncated",
                                 kind="decode_error") from None
        if any(p is None for p in pts) or time_base == 0.0:
            # Containers without packet timestamps (raw streams): take them from decoded frames.
            container.close()
            container = _open(path)
            stream = container.streams.video[0]
            try:
                frames = [(f.pts, f.time_base) for f in container.decode(stream)]
            except av.error.FFmpegError as e:
                raise VideoReadError(f"{path}: decoding failed ({e})", kind="decode_error") from None
            if any(p is None for p, _ in frames):
                raise VideoReadError(f"{path}: frames carry no timestamps; remux it (ffmpeg -i in -c copy out.mp4)",
                                     kind="unreadable")
            pts = [p for p, _ in frames]
            time_base = float(frames[0][1]) if frames else time_base
        return np.unique(np.asarray(pts, dtype=np.int64)), time_base, info[0], info[1], info[2]
    finally:
        container.close()


def _decode_selected(path: str, wanted: list[int], seek_pts: int | None, size: int) -> dict[int, np.ndarray]:
    """Decode from the keyframe at or before ``seek_pts`` (None: from the start) and convert the
    frames whose pts are in ``wanted``. Returns {pts: (size, size, 3) uint8}."""
    import av

    container = _open(path)
    remaining = set(wanted)
    out: dict[int, np.ndarray] = {}
    decoded = 0
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if seek_pts is not None:
            try:
                container.seek(seek_pts, stream=stream, backward=True, any_frame=False)
            except av.error.FFmpegError:
                # some containers (e.g. .swf) refuse to seek (EPERM): decode from the start instead
                container.close()
                return _decode_selected(path, wanted, None, size)
        try:
            for frame in container.decode(stream):
                decoded += 1
                if frame.pts in remaining:
                    out[frame.pts] = frame_to_square(frame, size)
                    remaining.discard(frame.pts)
                    if not remaining:
                        break
        except av.error.FFmpegError as e:
            if decoded == 0 and seek_pts is None:
                raise VideoReadError(undecodable_message(path, stream, e), kind="unsupported_codec") from None
            raise VideoReadError(f"{path}: decoding failed after {decoded} frames ({e}); the file is corrupt or "
                                 "truncated", kind="decode_error") from None
    finally:
        container.close()
    return out


def undecodable_message(path: str, stream, error: Exception) -> str:
    """Why not one frame of the stream decodes: the codec named, and the fix."""
    codec = stream.codec_context.name if stream.codec_context is not None else "unknown"
    return (f"{path}: not one frame of its '{codec}' video stream decodes with this PyAV/FFmpeg build ({error}); "
            f"the codec (or this variant of it) is not supported here. Transcode the file, e.g. "
            f"ffmpeg -i {os.path.basename(path)} -c:v libx264 -pix_fmt yuv420p out.mp4")


def read_clip(path: str, image_size: int, fps: float, max_frames: int,
              start: float | None = None, end: float | None = None) -> DecodedClip:
    """Decode the frames of ``[start, end)`` chosen by :func:`select_frames`, each resized to
    cover and center-cropped to ``image_size`` square. Returns frames (T, S, S, 3) uint8."""
    pts, time_base, native_fps, size, codec = _frame_pts(path)
    if len(pts) == 0:
        raise VideoReadError(f"{path}: holds no video frames", kind="no_frames")
    times = (pts - pts[0]) * time_base
    chosen = select_frames(times, start, end, fps, max_frames)
    if len(chosen) == 0:
        raise VideoReadError(f"{path}: clip [{start}, {end}) s holds no frames (video is "
                             f"{times[-1]:.3f} s long)", kind="no_frames")
    wanted = [int(pts[i]) for i in chosen]
    # Seek only when the clip starts well into the video; 1 s of slack before the first wanted frame.
    lead = float(times[chosen[0]]) - 1.0
    seek_pts = int(pts[0]) + int(lead / time_base) if lead > 0 else None
    got = _decode_selected(path, wanted, seek_pts, image_size)
    if len(got) < len(wanted) and seek_pts is not None:
        got = _decode_selected(path, wanted, None, image_size)  # the seek landed past a wanted frame
    missing = [p for p in wanted if p not in got]
    if missing:
        raise VideoReadError(f"{path}: {len(missing)} of {len(wanted)} selected frames could not be decoded "
                             f"(first at {(missing[0] - pts[0]) * time_base:.3f} s); the file is corrupt or truncated",
                             kind="decode_error")
    frames = np.stack([got[p] for p in wanted])
    return DecodedClip(frames=frames, timestamps=[round(float(times[i]), 6) for i in chosen],
                       native_fps=native_fps, original_size=(int(size[0]), int(size[1])), codec=codec)
