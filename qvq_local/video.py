"""Clips: decide what a video file is, sample its frames by time, and size them to a token budget.

A clip reaches a model as a handful of frames, so a clip costs what its sampled frames cost, never its
length: :func:`load_video` reads the header (PyAV, FFmpeg inside its wheels; no system ffmpeg), plans the
timestamps to sample (:func:`plan_clip`), and seeks to each one (:class:`_FrameReader`), decoding only
from the keyframe before it.  Frames are chosen by their presentation times, never by index, so a
variable-frame-rate clip is sampled where its times say; the display matrix (a phone's portrait clip) is
honoured, as viewers show it.

The rule, as Qwen's video processors sample (``fps`` 2, at least 4 and at most 768 frames, in whole
temporal patches of 2 frames), with a token budget on top:

* frames wanted: ``duration x fps``, at least the family's ``video_min_frames``, at most ``max_frames``
  and the frames the clip has, rounded down to whole temporal patches;
* the budget (``video_tokens``, default :func:`video_token_default`) sets the frame size: each temporal
  patch gets ``video_tokens / patches`` tokens, the frame is resized by the family's rule within the
  family's video pixel bounds; when even the smallest frame the family allows does not fit that many
  patches, fewer frames are taken (evenly over the whole clip) and the clip says so in its notes;
* timestamps: evenly spaced from the first frame to the last (``linspace``, as Qwen3-VL's processor and
  qwen-vl-utils do), each the frame on screen at that time.

What is a clip: a file in a video container (MP4/MOV, Matroska/WebM, AVI, MPEG-TS/PS, FLV, Ogg), and an
animated GIF, PNG (APNG) or WebP with more than one frame: someone who asks about an animation asks
about its motion.  A still GIF/PNG/WebP stays an image (``qvq_local.images``).  :func:`load_frames` makes
a clip of images a user already has (a list or a folder, in natural order: frame2 before frame10).

Errors are one line naming the file (:class:`~qvq_local.errors.InputError`): missing, empty, not a
video, corrupt or truncated before any frame, audio only, zero-length, and :class:`~qvq_local.errors.
MediaTooLarge` (the server's 413) for a frame over :data:`MAX_FRAME_PIXELS` or a clip over a duration
limit, both read from the header before any frame is decoded.  PyAV is optional (``pip install
'qvq-local[video]'``) and imported only here, only when a clip is read.
"""

from __future__ import annotations

import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from qvq_local.errors import InputError, MediaTooLarge
from qvq_local.families import DEFAULT_FAMILY, Family

INSTALL_HINT = "pip install 'qvq-local[video]'"

#: Largest frame decoded at all (8192 x 8192, ~67 megapixels: 8K video is 33).  Anything larger is refused
#: from the header, before any frame is decoded.
MAX_FRAME_PIXELS = 8192 * 8192

#: Video tokens a clip gets by default, by machine class: a CPU encodes a 768-token clip (12 frames of
#: 128 tokens a pair at the family's least frame size) in about three times an image's default; a GPU or
#: Apple Silicon affords Qwen's own video default (768 tokens a frame pair, a few patches).
VIDEO_TOKEN_DEFAULTS = {"cpu": 768, "gpu": 4096}

#: Past this gap (seconds) to the next sampled time the reader seeks instead of decoding on, provided a
#: keyframe lies in between (seeking lands on the keyframe before the target, decoding from there).
SEEK_GAP_S = 1.0

# Container signatures (the first bytes), for telling a clip from an image before either library opens it.
_ISO_BRANDS_IMAGE = (b"heic", b"heix", b"mif1", b"msf1", b"avif", b"avis", b"hevc", b"heim", b"heis")


def video_token_default(machine: str = "cpu") -> int:
    """The default video token budget for a machine class: ``"cpu"`` (no GPU) or ``"gpu"`` (CUDA, Metal)."""
    return VIDEO_TOKEN_DEFAULTS.get(machine, VIDEO_TOKEN_DEFAULTS["cpu"])


# ------------------------------------------------------------------------------------------ what a file is


def _animated_image_frames(path: Path, head: bytes) -> int:
    """Frames of a GIF/PNG/WebP from its header (APNG's acTL, WebP's ANIM, Pillow for GIF), 1 for stills."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        # APNG: an acTL chunk before the first IDAT says how many frames
        pos = 8
        with open(path, "rb") as fh:
            data = fh.read(1 << 16)
        while pos + 8 <= len(data):
            length = int.from_bytes(data[pos : pos + 4], "big")
            kind = data[pos + 4 : pos + 8]
            if kind == b"acTL" and pos + 12 <= len(data):
                return max(1, int.from_bytes(data[pos + 8 : pos + 12], "big"))
            if kind == b"IDAT":
                return 1
            pos += 12 + length
        return 1
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return 2 if b"ANIM" in head[:64] else 1
    if head[:6] in (b"GIF87a", b"GIF89a"):
        try:
            from PIL import Image

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(path) as im:
                    return int(getattr(im, "n_frames", 1))
        except Exception:  # noqa: BLE001 - a broken GIF is the image loader's to name
            return 1
    return 1


#: Suffixes that name a video file: such a path is a clip even where its bytes are not one (an empty or
#: broken file is then told it is not a readable video, not that it is not an image)
VIDEO_SUFFIXES = (
    ".mp4",
    ".m4v",
    ".mov",
    ".mkv",
    ".webm",
    ".avi",
    ".mpg",
    ".mpeg",
    ".ts",
    ".flv",
    ".ogv",
    ".3gp",
)


def is_video_file(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a clip (a video container, or an animated GIF/APNG/WebP), from its first
    bytes; False for images, other files and anything unreadable (the image loader names those)."""
    p = Path(path)
    try:
        if not p.is_file():
            return False
        with open(p, "rb") as fh:
            head = fh.read(512)
    except OSError:
        return False
    if len(head) < 12:
        return False
    if head[4:8] == b"ftyp":
        return head[8:12] not in _ISO_BRANDS_IMAGE
    if head[4:8] in (b"moov", b"mdat", b"free", b"wide", b"skip"):
        return True  # a QuickTime file without ftyp
    if head.startswith(b"\x1a\x45\xdf\xa3"):  # EBML: Matroska / WebM
        return True
    if head.startswith(b"RIFF") and head[8:12] in (b"AVI ", b"AVIX"):
        return True
    if head.startswith(b"FLV") or head.startswith(b"OggS") or head.startswith(b"\x00\x00\x01\xba"):
        return True
    if head[0] == 0x47 and len(head) > 376 and head[188] == 0x47 and head[376] == 0x47:  # MPEG-TS
        return True
    if head.startswith((b"\x89PNG", b"GIF87a", b"GIF89a")) or (
        head.startswith(b"RIFF") and head[8:12] == b"WEBP"
    ):
        return _animated_image_frames(p, head) > 1
    return False


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def frame_files(paths: list[str | os.PathLike]) -> list[Path]:
    """The image files of ``--frames``: a list of files as given, or one folder's images in natural order."""
    if len(paths) == 1 and Path(paths[0]).is_dir():
        folder = Path(paths[0])
        files = sorted(
            (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES),
            key=lambda p: _natural_key(p.name),
        )
        if not files:
            raise InputError("has no image files to use as frames", path=folder)
        return files
    if not paths:
        raise InputError("--frames needs at least one image file or a folder of them")
    return [Path(p) for p in paths]


# ------------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class VideoOptions:
    """How a clip is sampled: frames a second, the most frames, the video token budget.  ``None``: the
    family's (fps, most frames) or the machine's (:func:`video_token_default`) default.  ``min_pixels`` /
    ``max_pixels`` bound one frame (default: the family's video bounds); ``max_duration`` (seconds) refuses
    longer clips and ``max_source_pixels`` larger stored frames, from the header (the server's limits;
    None: any length, :data:`MAX_FRAME_PIXELS`)."""

    fps: float | None = None
    max_frames: int | None = None
    video_tokens: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    max_duration: float | None = None
    max_source_pixels: int | None = None

    def check(self) -> None:
        """One-line InputErrors for values no clip can be sampled with (before any file is read)."""
        if self.fps is not None and not (math.isfinite(self.fps) and 0 < self.fps <= 120):
            raise InputError(f"--fps must be a number above 0 and at most 120, got {self.fps}")
        for name in ("max_frames", "video_tokens", "min_pixels", "max_pixels", "max_source_pixels"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(
                    f"--{name.replace('_', '-')} must be a whole number of at least 1, got {value!r}"
                )
        if self.max_duration is not None and not (math.isfinite(self.max_duration) and self.max_duration > 0):
            raise InputError(f"the duration limit must be above 0 seconds, got {self.max_duration}")


@dataclass(frozen=True)
class ClipPlan:
    """What to take from a clip: the times to sample (seconds from its first frame), the frame size
    (width, height) and the video tokens it costs, with notes for the user."""

    times: tuple[float, ...]
    frame_size: tuple[int, int]
    tokens: int
    temporal_patch: int
    notes: tuple[str, ...] = ()


def _frame_tokens(size: tuple[int, int], factor: int) -> int:
    return (size[0] // factor) * (size[1] // factor)


def _fit_frame(width: int, height: int, budget: int, family: Family, factor: int, min_px: int, max_px: int):
    """The family's resize of a ``width`` x ``height`` frame within ``[min_px, max_px]`` and ``budget``
    tokens (a frame smaller than the budget allows is kept at the family's rounding)."""
    cap = min(max_px, budget * factor * factor)
    size = family.smart_resize(width, height, min_pixels=min(min_px, cap), max_pixels=cap, factor=factor)
    w, h = size
    while _frame_tokens((w, h), factor) > budget and (w > factor or h > factor):
        if w >= h:
            w -= factor
        else:
            h -= factor
    return w, h


def plan_clip(
    *,
    duration: float,
    last_time: float,
    frame_count: int,
    width: int,
    height: int,
    family: Family = DEFAULT_FAMILY,
    options: VideoOptions = VideoOptions(),
    temporal_patch: int | None = None,
    machine: str = "cpu",
) -> ClipPlan:
    """The sampling plan for a clip of ``duration`` seconds whose last frame starts at ``last_time``, with
    ``frame_count`` frames (an estimate is fine) of ``width`` x ``height`` (upright).

    ``temporal_patch``: frames that share one set of tokens (the family's 2 for a native video path; 1
    where each frame goes in as its own image).  Raises InputError when the budget cannot hold one patch.
    """
    options.check()
    tps = max(1, int(temporal_patch or family.temporal_patch_size))
    factor = family.image_factor
    fps = options.fps or family.video_fps
    max_frames = options.max_frames or family.video_max_frames
    budget = options.video_tokens or video_token_default(machine)
    min_px = options.min_pixels or family.video_min_pixels
    max_px = max(options.max_pixels or family.video_max_pixels, factor * factor)
    notes: list[str] = []

    available = max(1, int(frame_count))
    wanted = max(int(duration * fps), family.video_min_frames)
    wanted = min(wanted, max_frames, available)
    if wanted >= tps:
        wanted -= wanted % tps
    patches = max(1, math.ceil(wanted / tps))

    # the least frame the family takes, and so the most patches the budget holds
    floor = _fit_frame(width, height, 10**9, family, factor, min_px, max(min_px, factor * factor))
    floor_tokens = _frame_tokens(floor, factor)
    fit = budget // max(1, floor_tokens)
    if fit < 1:
        raise InputError(
            f"--video-tokens {budget} is below what one {'frame' if tps == 1 else f'{tps}-frame patch'} of this "
            f"clip costs at the family's least frame size ({floor[0]}x{floor[1]}, {floor_tokens} tokens)"
        )
    if fit < patches:
        notes.append(
            f"{fit * tps} of {patches * tps} frames: the {budget}-token video budget holds no more at the "
            f"least frame size ({floor[0]}x{floor[1]}); raise --video-tokens for more"
        )
        patches = fit
        wanted = min(wanted, patches * tps)
    if wanted < (options.fps or family.video_fps) * duration and wanted == max_frames:
        notes.append(f"{wanted} frames: --max-frames caps the sampling below {fps:g} a second")
    per_patch = budget // patches
    size = _fit_frame(width, height, per_patch, family, factor, min_px, max_px)
    n = wanted
    if n == 1:
        times = (0.0,)
    else:
        step = max(0.0, last_time) / (n - 1)
        times = tuple(round(i * step, 6) for i in range(n))
    tokens = math.ceil(n / tps) * _frame_tokens(size, factor)
    return ClipPlan(times=times, frame_size=size, tokens=tokens, temporal_patch=tps, notes=tuple(notes))


# ------------------------------------------------------------------------------------------ the clip


@dataclass
class Clip:
    """A clip as it reaches the model: its sampled frames (RGB, all ``frame_size``) and their times."""

    path: str
    frames: list  # list[PIL.Image.Image]
    timestamps: list[float]  # seconds from the clip's first frame, of each frame as decoded
    duration: float  # seconds
    source_size: tuple[int, int]  # (width, height), upright
    frame_size: tuple[int, int]  # (width, height) the frames were resized to
    tokens: int  # video tokens on the path it was planned for
    temporal_patch: int  # frames sharing one set of tokens on that path (2 native, 1 as images)
    decode_s: float = 0.0  # seconds spent opening, seeking, decoding and resizing
    decoded_frames: int = 0  # frames the decoder produced (what the clip cost)
    seeks: int = 0
    source_fps: float | None = None
    kind: str = "video"  # "video": a file; "frames": images a user gave
    notes: list[str] = field(default_factory=list)

    @property
    def sample_fps(self) -> float:
        """Frames a second actually sampled (frames over the span they cover)."""
        if len(self.timestamps) < 2:
            return 0.0
        span = self.timestamps[-1] - self.timestamps[0]
        return (len(self.timestamps) - 1) / span if span > 0 else 0.0

    def fingerprint(self) -> str:
        """A digest of the sampled frames' pixels, their times and size (the prefix cache's key for a clip:
        the same clip sampled the same way gives the same key; another sampling, another key)."""
        import hashlib

        h = hashlib.sha256()
        h.update(f"{self.frame_size}|{self.temporal_patch}|".encode())
        for t, frame in zip(self.timestamps, self.frames):
            h.update(f"{t:.6f}|".encode())
            h.update(frame.tobytes())
        return h.hexdigest()


def _import_av():
    try:
        import av
    except ImportError:
        raise InputError("reading video needs PyAV, which is not installed", hint=INSTALL_HINT) from None
    return av


def _reason(err: BaseException) -> str:
    """FFmpeg's words for what went wrong, without its errno and the path (the message names the file)."""
    text = " ".join(str(err).split()) or type(err).__name__
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", text)
    text = re.sub(r":\s*'[^']*'$", "", text)
    return text[:160]


def _check_file(p: Path, name: str) -> None:
    try:
        st = p.stat()
    except FileNotFoundError:
        raise InputError("no such video file", path=name) from None
    except OSError as err:
        raise InputError(f"cannot read video file ({err.strerror or err})", path=name) from None
    if p.is_dir():
        raise InputError("is a folder, not a video file (use --frames for a folder of images)", path=name)
    if not p.is_file():
        raise InputError("is not a regular file", path=name)
    if st.st_size == 0:
        raise InputError("is an empty file (0 bytes), not a video", path=name)


@dataclass(frozen=True)
class ClipHeader:
    """What a clip's header says, read without decoding a frame."""

    duration: float
    width: int  # upright
    height: int
    frame_count: int  # declared or estimated
    fps: float | None
    rotation: int  # degrees clockwise to turn stored frames upright
    codec: str
    last_time: float | None = None  # start of the last frame, where the header alone cannot tell


def _first_frame_rotation(container, stream) -> int:
    """Clockwise degrees from the first frame's display matrix (PyAV puts it on frames); 0 when no frame
    decodes here (the reader then names the problem).  The reader seeks before its first frame."""
    try:
        for frame in container.decode(stream):
            return _clockwise(float(getattr(frame, "rotation", 0) or 0))
    except Exception:  # noqa: BLE001 - a stream that does not decode is the reader's to report
        return 0
    return 0


def _last_frame_time(stream, header_duration: float, fps: float) -> float:
    """Start of the last frame (seconds from the first): from the container's index where it lists every
    frame (MP4), else the duration less one frame."""
    try:
        entries = stream.index_entries
        count = len(entries)
        if count and stream.frames and count >= stream.frames:
            tb = float(stream.time_base)
            start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
            return max(0.0, max(float(e.timestamp) for e in entries) * tb - start)
    except Exception:  # noqa: BLE001
        pass
    return max(0.0, header_duration - 1.0 / fps) if header_duration else 0.0


def _clockwise(counter_clockwise: float) -> int:
    return int(round(-counter_clockwise / 90.0)) % 4 * 90


def probe_video(path: str | os.PathLike, options: VideoOptions = VideoOptions()) -> ClipHeader:
    """Read a clip's header: its duration, stored size and frame count, and refuse what is over the limits
    (MediaTooLarge) or no clip at all (InputError), decoding no frame (so ``rotation`` is 0: the display
    matrix comes with the first decoded frame)."""
    p, name = Path(path), str(path)
    _check_file(p, name)
    av = _import_av()
    container = _open(av, p, name)
    try:
        return _header(container, name, options, rotation=False)[0]
    finally:
        container.close()


def _open(av, p: Path, name: str):
    try:
        return av.open(str(p), mode="r", metadata_errors="ignore")
    except av.error.EOFError:
        raise InputError(
            "has no frames: the file ends before its first one (zero-length or cut short)", path=name
        ) from None
    except av.error.FFmpegError as err:
        raise InputError(f"not a readable video ({_reason(err)})", path=name) from None
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise InputError(f"not a readable video ({_reason(err)})", path=name) from None


def _header(container, name: str, options: VideoOptions, *, rotation: bool = True):
    """(ClipHeader, stream) from an open container; the limits checked."""
    streams = list(container.streams.video)
    if not streams:
        kinds = sorted({s.type for s in container.streams})
        what = (
            f"only {', '.join(kinds)}" if kinds else "no streams at all: a zero-length recording, or no video"
        )
        raise InputError(f"has no video stream ({what})", path=name)
    stream = streams[0]
    cc = stream.codec_context
    width, height = int(cc.width or 0), int(cc.height or 0)
    if width <= 0 or height <= 0:
        raise InputError(
            f"video stream has no frame size ({width}x{height}): corrupt or truncated header", path=name
        )
    limit = min(options.max_source_pixels or MAX_FRAME_PIXELS, MAX_FRAME_PIXELS)
    if width * height > limit:
        raise MediaTooLarge(
            f"video frames are too large to decode safely ({width}x{height} = {width * height:,} pixels, "
            f"limit {limit:,})",
            path=name,
        )
    tb = stream.time_base
    duration = None
    if stream.duration and tb:
        duration = float(stream.duration * tb)
    elif container.duration:
        duration = container.duration / 1_000_000
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else None
    frames = int(stream.frames or 0)
    if duration is None and frames and fps:
        duration = frames / fps
    last_time = None
    if duration is None or not math.isfinite(duration) or duration <= 0:
        # no duration in the header (APNG, some streams): read the packets' times, decoding nothing
        duration, frames, last_time = _scan_packets(container, stream)
    if not frames:
        frames = max(1, round(duration * fps)) if fps else 1
    if options.max_duration is not None and duration > options.max_duration:
        raise MediaTooLarge(
            f"clip is {duration:.1f} s long, over the {options.max_duration:g} s limit", path=name
        )
    # PyAV gives the display matrix on decoded frames only: the first frame's tells how to turn them all
    rotation = _first_frame_rotation(container, stream) if rotation else 0
    upright = (height, width) if rotation in (90, 270) else (width, height)
    header = ClipHeader(
        duration=duration,
        width=upright[0],
        height=upright[1],
        frame_count=frames,
        fps=fps,
        rotation=rotation,
        codec=str(getattr(cc, "name", "") or ""),
        last_time=last_time,
    )
    return header, stream


def _scan_packets(container, stream) -> tuple[float, int, float]:
    """(duration, frames, start of the last frame) from the packets' times, without decoding; zeros for a
    stream with no packets."""
    tb = float(stream.time_base)
    first = last = None
    end = 0.0
    count = 0
    try:
        for packet in container.demux(stream):
            if packet.pts is None or packet.size == 0:
                continue
            t = float(packet.pts) * tb
            count += 1
            first = t if first is None else min(first, t)
            last = t if last is None else max(last, t)
            end = max(end, t + float(packet.duration or 0) * tb)
    except Exception:  # noqa: BLE001 - a damaged tail: what was read is what there is
        pass
    if count == 0 or first is None:
        return 0.0, 0, 0.0
    container.seek(0, stream=stream, backward=True, any_frame=False)
    return max(end, last) - first, count, last - first


class _FrameReader:
    """The frame on screen at each asked time, seeking where a keyframe lies between here and there."""

    def __init__(self, av, container, stream, name: str):
        self.av, self.container, self.stream, self.name = av, container, stream, name
        self.tb = float(stream.time_base)
        self.start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        try:
            self.keys = sorted(float(e.timestamp) * self.tb for e in stream.index_entries if e.is_keyframe)
        except Exception:  # noqa: BLE001 - an index PyAV cannot read is no reason to fail
            self.keys = []
        self.frames = None
        self.prev = None  # the last frame at or before the last asked time
        self.pending = None  # a frame already decoded past it
        self.decoded = 0
        self.seeks = 0
        self.ended = False
        self.error: str | None = None

    def _time(self, frame) -> float:
        if frame.pts is None:
            return (self.prev_time() or 0.0) + 1e-6
        return float(frame.pts) * self.tb - self.start

    def prev_time(self) -> float | None:
        return self._time(self.prev) if self.prev is not None else None

    def _seek(self, t: float) -> None:
        offset = int(math.floor((t + self.start) / self.tb)) if self.tb else 0
        try:
            self.container.seek(max(0, offset), stream=self.stream, backward=True, any_frame=False)
        except self.av.error.FFmpegError:
            self.container.seek(0, stream=self.stream, backward=True, any_frame=False)
        self.frames = self.container.decode(self.stream)
        self.prev = self.pending = None
        self.ended = False
        self.seeks += 1

    def _seek_before(self, t: float) -> None:
        """Seek so that decoding starts at or before ``t``: some demuxers land on a keyframe after the
        asked time, so step further back (1, 2, 4 ... s) until the first frame is not past ``t``."""
        back = 0.0
        while True:
            self._seek(max(0.0, t - back))
            first = self._next()
            if first is None:
                return
            self.pending = first
            if self._time(first) <= t + 1e-6 or t - back <= 0:
                return
            back = 1.0 if back == 0 else back * 2

    def _next(self):
        if self.pending is not None:
            frame, self.pending = self.pending, None
            return frame
        if self.ended:
            return None
        try:
            frame = next(self.frames)
        except StopIteration:
            self.ended = True
            return None
        except (self.av.error.FFmpegError, ValueError, EOFError) as err:
            self.ended = True
            self.error = _reason(err)
            return None
        self.decoded += 1
        return frame

    def _should_seek(self, t: float) -> bool:
        if self.frames is None:
            return True  # the first read: seek to the first target (a no-op at 0)
        here = self._time(self.pending) if self.pending is not None else self.prev_time()
        if here is None:
            return False
        if t < here - 1e-9 and (self.prev is None or t < self.prev_time() - 1e-9):
            return True  # behind us
        if t - here <= SEEK_GAP_S:
            return False
        # only worth it when a keyframe lies after where we are and at or before the target
        return not self.keys or any(here < k <= t + 1e-9 for k in self.keys)

    def frame_at(self, t: float):
        """(time, frame) of the frame on screen at ``t`` seconds (the last one starting at or before it;
        the first one when ``t`` is before it); None when nothing could be decoded."""
        if self._should_seek(t):
            self._seek_before(t)
        while True:
            frame = self._next()
            if frame is None:
                return (self.prev_time(), self.prev) if self.prev is not None else None
            ft = self._time(frame)
            if ft > t + 1e-6:
                if self.prev is None:  # the target is before the first frame after the seek
                    self.prev = frame
                    return ft, frame
                self.pending = frame
                return self.prev_time(), self.prev
            self.prev = frame


def _upright(image, rotation: int):
    from PIL import Image

    if rotation == 90:
        return image.transpose(Image.Transpose.ROTATE_270)
    if rotation == 180:
        return image.transpose(Image.Transpose.ROTATE_180)
    if rotation == 270:
        return image.transpose(Image.Transpose.ROTATE_90)
    return image


def load_video(
    path: str | os.PathLike,
    options: VideoOptions = VideoOptions(),
    *,
    family: Family = DEFAULT_FAMILY,
    temporal_patch: int | None = None,
    machine: str = "cpu",
) -> Clip:
    """Open ``path``, plan its sampling (:func:`plan_clip`) and decode just the sampled frames, upright,
    resized to the plan's frame size.  One-line InputError / MediaTooLarge for anything unusable."""
    from PIL import Image

    options.check()
    p, name = Path(path), str(path)
    _check_file(p, name)
    av = _import_av()
    t0 = time.perf_counter()
    container = _open(av, p, name)
    try:
        header, stream = _header(container, name, options)
        fps = header.fps or (options.fps or family.video_fps)
        if header.last_time is not None:
            last = header.last_time
        else:
            last = _last_frame_time(stream, header.duration, fps)
        plan = plan_clip(
            duration=header.duration,
            last_time=last,
            frame_count=header.frame_count,
            width=header.width,
            height=header.height,
            family=family,
            options=options,
            temporal_patch=temporal_patch,
            machine=machine,
        )
        reader = _FrameReader(av, container, stream, name)
        frames, times = [], []
        rotation = header.rotation
        stored = None
        for target in plan.times:
            found = reader.frame_at(target)
            if found is None:
                break
            ft, frame = found
            if stored is None:
                stored = (frame.width, frame.height)
            w, h = plan.frame_size
            if rotation in (90, 270):
                w, h = h, w
            try:
                rgb = frame.to_image()
            except Exception as err:  # noqa: BLE001 - a frame PyAV cannot convert
                raise InputError(f"cannot convert a video frame to RGB ({_reason(err)})", path=name) from None
            if rgb.size != (w, h):
                rgb = rgb.resize((w, h), Image.Resampling.BICUBIC)
            frames.append(_upright(rgb, rotation))
            times.append(round(max(0.0, ft), 6))
    finally:
        container.close()
    if not frames:
        if reader.error:
            raise InputError(
                f"no frame could be decoded: the video is corrupt or truncated ({reader.error})", path=name
            )
        if header.duration <= 0:
            raise InputError("is a zero-length clip: it has no frames", path=name)
        raise InputError("no frame could be decoded: the video is corrupt or truncated", path=name)
    notes = list(plan.notes)
    if rotation in (90, 180, 270):
        notes.append(f"turned {rotation}° clockwise as its display matrix says")
    if len(frames) < len(plan.times) or (times and len(set(times)) < len(times) and header.duration > 0):
        reached = max(times)
        notes.append(
            f"the stream ends at {reached:.1f} s, before its declared {header.duration:.1f} s: later samples "
            "repeat its last frame"
            if reader.error or reached + 2.0 / fps < plan.times[-1]
            else "some samples fall on the same frame (the clip has fewer distinct frames than samples)"
        )
        while len(frames) < len(plan.times):
            frames.append(frames[-1])
            times.append(times[-1])
    if stored is not None:
        src = (stored[1], stored[0]) if rotation in (90, 270) else stored
    else:
        src = (header.width, header.height)
    return Clip(
        path=name,
        frames=frames,
        timestamps=times,
        duration=header.duration,
        source_size=src,
        frame_size=plan.frame_size,
        tokens=plan.tokens,
        temporal_patch=plan.temporal_patch,
        decode_s=time.perf_counter() - t0,
        decoded_frames=reader.decoded,
        seeks=reader.seeks,
        source_fps=header.fps,
        kind="video",
        notes=notes,
    )


def load_frames(
    paths: list[str | os.PathLike],
    options: VideoOptions = VideoOptions(),
    *,
    family: Family = DEFAULT_FAMILY,
    temporal_patch: int | None = None,
    machine: str = "cpu",
) -> Clip:
    """A clip made of images a user already has (``--frames``): a list of files or one folder.  The images
    are taken as ``--fps`` frames a second (default the family's 2); more than the plan takes are sampled
    evenly; every frame is resized to the plan's size (the first image's aspect)."""
    from qvq_local.images import load_image

    options.check()
    files = frame_files(paths)
    t0 = time.perf_counter()
    fps = options.fps or family.video_fps
    first, info = load_image(files[0], max_pixels=MAX_FRAME_PIXELS, min_pixels=1, factor=1)
    width, height = info.original_size
    duration = len(files) / fps
    plan = plan_clip(
        duration=duration,
        last_time=(len(files) - 1) / fps,
        frame_count=len(files),
        width=width,
        height=height,
        family=family,
        options=options,
        temporal_patch=temporal_patch,
        machine=machine,
    )
    from PIL import Image

    frames, times, notes = [], [], list(plan.notes)
    picked = [min(len(files) - 1, int(round(t * fps))) for t in plan.times]
    resized_any = False
    for index in picked:
        image = (
            first
            if index == 0
            else load_image(files[index], max_pixels=MAX_FRAME_PIXELS, min_pixels=1, factor=1)[0]
        )
        if image.size != (width, height):
            resized_any = True
        frames.append(image.resize(plan.frame_size, Image.Resampling.BICUBIC))
        times.append(round(index / fps, 6))
    if resized_any:
        notes.append(
            f"frames of other sizes than the first ({width}x{height}) were resized to its frame size"
        )
    return Clip(
        path=str(paths[0]) if len(paths) == 1 else f"{len(files)} images",
        frames=frames,
        timestamps=times,
        duration=duration,
        source_size=(width, height),
        frame_size=plan.frame_size,
        tokens=plan.tokens,
        temporal_patch=plan.temporal_patch,
        decode_s=time.perf_counter() - t0,
        decoded_frames=len(set(picked)),
        source_fps=fps,
        kind="frames",
        notes=notes,
    )


__all__ = [
    "INSTALL_HINT",
    "MAX_FRAME_PIXELS",
    "Clip",
    "ClipHeader",
    "ClipPlan",
    "VideoOptions",
    "frame_files",
    "VIDEO_SUFFIXES",
    "is_video_file",
    "load_frames",
    "load_video",
    "plan_clip",
    "probe_video",
    "video_token_default",
]
