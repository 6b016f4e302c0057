"""Images that arrive over HTTP: ``data:`` URIs, and http(s) URLs only when the operator allowed them.

Never a file path or a ``file://`` URL: a client must not make the server read its own disk.  Every image
is written to a private temporary file and goes through :func:`qvq_local.images.load_image`, the same
validation ``qvq ask`` applies (format sniffing, decompression bombs, EXIF rotation, the pixel bound).
Limits answer 413: too many images, too many bytes, too many pixels (read from the header, never decoded;
an image over Pillow's own decompression-bomb limit is simply over the pixel limit too).

Decoding costs memory far beyond the bytes sent (a 36 MP PNG of 35 KB decodes to ~430 MB at its peak), so
every decode first takes its cost (:func:`qvq_local.images.decode_bytes`) from one :class:`DecodeBudget`
shared by all requests, and waits while the budget is spent: however many requests arrive, decoding holds
at most the budget at once (an image costlier than the whole budget waits until it can decode alone).

URL fetching refuses hosts that resolve to loopback, private, link-local, multicast or reserved addresses
(a server on a LAN must not become a proxy into it), follows no redirects, and stops reading at the byte
limit.  The check resolves the name once and connects to the address it checked, so a second DNS answer
cannot swap in a private address.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import socket
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from qvq_local.serve.schema import ApiError, ImageRef, VideoRef

if TYPE_CHECKING:  # pragma: no cover
    from qvq_local.detail import ImageBound


@dataclass(frozen=True)
class Limits:
    """What one request may carry."""

    max_body_bytes: int = 32 * 1024 * 1024
    max_json_values: int = 100_000  # commas, brackets and braces in the body: parsing costs memory per value
    max_images: int = 4
    max_image_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 40_000_000  # of the source image, before bounding to the model's max pixels
    allow_image_urls: bool = False
    url_timeout_s: float = 10.0
    decode_budget_bytes: int = 512 * 2**20  # image decoding across all requests at once (DecodeBudget)
    max_videos: int = 1  # clips in one request
    max_video_bytes: int = 24 * 1024 * 1024  # one clip's file (a data: URI also counts against the body)
    max_video_seconds: float = 600.0  # from the clip's header, before any frame is decoded
    max_video_frames: int = 64  # frames sampled from a file, or URLs in a frame list


class DecodeBudget:
    """The memory image decoding may hold at once, across all requests: a semaphore weighted in bytes.

    ``hold(cost)`` waits until ``cost`` more bytes fit under ``total``, then holds them until its block ends.
    A cost over the whole budget is capped at it: that image waits until nothing else decodes.  ``peak`` is
    the most ever held (for tests and ``/health``).
    """

    def __init__(self, total: int):
        if total <= 0:
            raise ValueError(f"a decode budget must be above 0 bytes, got {total}")
        self.total = total
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, cost: int) -> Iterator[None]:
        cost = max(0, min(cost, self.total))
        with self._cond:
            self._cond.wait_for(lambda: self.used + cost <= self.total)
            self.used += cost
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cond:
                self.used -= cost
                self._cond.notify_all()

    def state(self) -> dict:
        with self._cond:
            return {"total_bytes": self.total, "used_bytes": self.used, "peak_bytes": self.peak}


def _too_large(message: str, param: str) -> ApiError:
    return ApiError(413, message, param=param, code="request_too_large")


def _decode_data_uri(ref: ImageRef, limits: Limits, what: str = "image") -> bytes:
    most = limits.max_video_bytes if what == "video" else limits.max_image_bytes
    header, sep, payload = ref.url.partition(",")
    if not sep or not header.startswith("data:"):
        raise ApiError(400, f"{ref.where}: malformed data URI", param=ref.where)
    if not header.endswith(";base64"):
        raise ApiError(400, f"{ref.where}: data URIs must be base64-encoded", param=ref.where)
    if len(payload) * 3 // 4 > most:
        raise _too_large(f"{ref.where}: {what} is over {most} bytes", ref.where)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{ref.where}: the data URI is not valid base64", param=ref.where) from None


def _public_address(host: str, port: int, where: str) -> tuple:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        raise ApiError(400, f"{where}: cannot resolve host {host!r}", param=where) from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if not address.is_global or address.is_multicast:
            raise ApiError(
                400,
                f"{where}: {host} resolves to a non-public address ({address}); refused",
                param=where,
                code="image_url_refused",
            )
    return infos[0]


def _fetch(ref: ImageRef, limits: Limits, what: str = "image") -> bytes:
    import http.client
    import ssl

    most = limits.max_video_bytes if what == "video" else limits.max_image_bytes
    parts = urlsplit(ref.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApiError(400, f"{ref.where}: only http(s) image URLs can be fetched", param=ref.where)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    family, _, _, _, sockaddr = _public_address(parts.hostname, port, ref.where)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(limits.url_timeout_s)
        sock.connect(sockaddr)  # the address that was checked, not a fresh lookup
        if parts.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
        conn = http.client.HTTPConnection(parts.hostname, port, timeout=limits.url_timeout_s)
        conn.sock = sock
        conn.request("GET", path, headers={"Host": parts.netloc, "User-Agent": "qvq-local"})
        response = conn.getresponse()
        if response.status != 200:
            raise ApiError(
                400, f"{ref.where}: fetching the {what} gave HTTP {response.status}", param=ref.where
            )
        data = response.read(most + 1)
        conn.close()
    except (OSError, http.client.HTTPException) as err:
        raise ApiError(400, f"{ref.where}: cannot fetch the {what} ({err})", param=ref.where) from None
    if len(data) > most:
        raise _too_large(f"{ref.where}: {what} is over {most} bytes", ref.where)
    return data


def image_bytes(ref: ImageRef, limits: Limits, what: str = "image") -> bytes:
    """The raw bytes of one image part (413 over the byte limit, 400 for anything not allowed); ``what``
    "video": a clip's file, under the video byte limit."""
    scheme = ref.url.split(":", 1)[0].lower() if ":" in ref.url else ""
    if scheme == "data":
        return _decode_data_uri(ref, limits, what)
    if scheme in ("http", "https"):
        if not limits.allow_image_urls:
            raise ApiError(
                400,
                f"{ref.where}: {what} URLs are off on this server (send a data: URI, or start qvq serve "
                "with --allow-image-urls)",
                param=ref.where,
                code="image_url_refused",
            )
        return _fetch(ref, limits, what)
    raise ApiError(
        400,
        f"{ref.where}: {what}s must be data: URIs or http(s) URLs, not {scheme or 'a path'}",
        param=ref.where,
    )


def return_freed_memory() -> bool:
    """Make the C allocator hand large freed blocks back to the system at once (glibc: a fixed mmap
    threshold of 1 MiB); True when it took.  Called once by ``qvq serve``, which owns its process.

    Pillow decodes a large image into 16 MiB blocks.  glibc raises its mmap threshold after the first such
    block is freed, so the later ones come from per-thread arenas that keep what they held: decoding a
    36 MP PNG twelve times, one at a time, from a pool of threads peaked at 2.2 GB and the server's RSS
    stayed above 1 GB after a load; with the fixed threshold the same run peaks at 426 MB (one decode's
    worth) and the memory goes back when the decode ends, which is what :class:`DecodeBudget` assumes.
    Elsewhere (macOS, musl) nothing changes.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 1 << 20))


def check_count(refs: list[ImageRef], limits: Limits) -> None:
    """413 when a request carries more images than this server takes (cheap: nothing is read)."""
    if len(refs) > limits.max_images:
        raise _too_large(
            f"{len(refs)} images in one request; this server takes at most {limits.max_images}", "messages"
        )


def _probe(path: str, ref: ImageRef, limits: Limits) -> int:
    """The header's verdict, before any pixel is decoded: 413 over the pixel limit (Pillow's own bomb limit
    included), else what decoding will cost in bytes (0 for what is not an image: load_image says why)."""
    from PIL import Image

    from qvq_local.images import decode_bytes

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: the limit here decides
            with Image.open(path) as probe:
                width, height = probe.size
                cost = decode_bytes(width, height, probe.mode, "transparency" in probe.info)
    except Image.DecompressionBombError:
        raise _too_large(
            f"{ref.where}: image is over {limits.max_image_pixels} pixels (beyond Pillow's decompression-bomb "
            "limit)",
            ref.where,
        ) from None
    except Exception:  # noqa: BLE001 - not an image: load_image says why, in its words
        return 0
    if width * height > limits.max_image_pixels:
        raise _too_large(
            f"{ref.where}: image is {width}x{height}, over {limits.max_image_pixels} pixels", ref.where
        )
    return cost


def load_images(
    refs: list[ImageRef], limits: Limits, bounds: list[ImageBound], budget: DecodeBudget | None = None
) -> list:
    """Every image of a request as :class:`qvq_local.images.PreparedImage` (validated and bounded), one after
    another, each decoded while holding its cost from ``budget`` (None: no shared budget).

    ``bounds``: each image's bound on the model's grid (:meth:`qvq_local.model.Model.image_bound` of its
    part's ``detail`` and ``max_pixels``, else the server's default), one per ref."""
    from qvq_local.errors import InputError
    from qvq_local.images import PreparedImage, load_image

    check_count(refs, limits)
    prepared = []
    with tempfile.TemporaryDirectory(prefix="qvq-serve-") as folder:
        for ref, bound in zip(refs, bounds, strict=True):
            data = image_bytes(ref, limits)
            path = os.path.join(folder, f"image-{ref.index}")
            with open(path, "wb") as fh:
                fh.write(data)
            del data
            cost = _probe(path, ref, limits)
            with budget.hold(cost) if budget is not None else nullcontext():
                try:
                    image, info = load_image(
                        path, bound.max_pixels, min_pixels=bound.min_pixels, factor=bound.factor
                    )
                except InputError as err:
                    reason = str(err).split(": ", 1)[-1]
                    raise ApiError(
                        400, f"{ref.where}: {reason}", param=ref.where, code="invalid_image"
                    ) from None
                info.path = f"image {ref.index + 1}"
                image.load()
            prepared.append(PreparedImage(image, info))
    return prepared


# ------------------------------------------------------------------------------------------ clips


def check_videos(refs: list[VideoRef], limits: Limits) -> None:
    """413 when a request carries more clips, or a frame list more frames, than this server takes (cheap:
    nothing is read; called before a queue place is taken)."""
    if len(refs) > limits.max_videos:
        raise _too_large(
            f"{len(refs)} clips in one request; this server takes at most {limits.max_videos}", "messages"
        )
    for ref in refs:
        if not ref.is_file and len(ref.urls) > limits.max_video_frames:
            raise _too_large(
                f"{ref.where}: {len(ref.urls)} frames; this server takes at most {limits.max_video_frames}",
                ref.where,
            )


def _clip_error(err, ref: VideoRef) -> ApiError:
    """A video module error as the API's: 413 for a limit, 400 for a bad clip, the part named."""
    from qvq_local.errors import MediaTooLarge

    reason = str(err).split(": ", 1)[-1]
    if isinstance(err, MediaTooLarge):
        return _too_large(f"{ref.where}: {reason}", ref.where)
    return ApiError(400, f"{ref.where}: {reason}", param=ref.where, code="invalid_video")


def load_clip(
    ref: VideoRef,
    limits: Limits,
    options,
    *,
    family,
    temporal_patch: int | None = None,
    machine: str = "cpu",
    budget: DecodeBudget | None = None,
):
    """One clip of a request as :class:`qvq_local.video.Clip`: its file (or its frames, each an image under
    the image rules) fetched, its header checked against the limits (413, before any frame is decoded),
    then its sampled frames decoded while holding their cost from ``budget``."""
    from dataclasses import replace

    from qvq_local import video
    from qvq_local.errors import InputError

    options = replace(
        options,
        max_duration=limits.max_video_seconds,
        max_frames=min(options.max_frames or limits.max_video_frames, limits.max_video_frames),
        fps=ref.fps or options.fps,
        max_source_pixels=limits.max_image_pixels,
    )
    with tempfile.TemporaryDirectory(prefix="qvq-serve-") as folder:
        if ref.is_file:
            data = image_bytes(ImageRef(url=ref.urls[0], index=0, where=ref.where), limits, "video")
            path = os.path.join(folder, "clip")
            with open(path, "wb") as fh:
                fh.write(data)
            del data
            try:
                header = video.probe_video(path, options)
                cost = header.width * header.height * 12  # a decoded frame and its RGB copies, one at a time
                with budget.hold(cost) if budget is not None else nullcontext():
                    clip = video.load_video(
                        path, options, family=family, temporal_patch=temporal_patch, machine=machine
                    )
            except InputError as err:
                raise _clip_error(err, ref) from None
            clip.path = ref.where
            return clip
        paths = []
        for i, url in enumerate(ref.urls):
            frame_ref = ImageRef(url=url, index=i, where=f"{ref.where}.video[{i}]")
            data = image_bytes(frame_ref, limits)
            path = os.path.join(folder, f"frame-{i:05d}")
            with open(path, "wb") as fh:
                fh.write(data)
            del data
            _probe(path, frame_ref, limits)
            paths.append(path)
        try:
            with (
                budget.hold(_probe(paths[0], ImageRef(url="", index=0, where=ref.where), limits))
                if budget
                else nullcontext()
            ):
                clip = video.load_frames(
                    paths, options, family=family, temporal_patch=temporal_patch, machine=machine
                )
        except InputError as err:
            raise _clip_error(err, ref) from None
        clip.path = ref.where
        return clip
