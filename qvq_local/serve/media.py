"""Images that arrive over HTTP: ``data:`` URIs, and http(s) URLs only when the operator allowed them.

Never a file path or a ``file://`` URL: a client must not make the server read its own disk.  Every image
is written to a private temporary file and goes through :func:`qvq_local.images.load_image`, the same
validation ``qvq ask`` applies (format sniffing, decompression bombs, EXIF rotation, the pixel bound).
Limits answer 413: too many images, too many bytes, too many pixels.

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
from dataclasses import dataclass
from urllib.parse import urlsplit

from qvq_local.serve.schema import ApiError, ImageRef


@dataclass(frozen=True)
class Limits:
    """What one request may carry."""

    max_body_bytes: int = 32 * 1024 * 1024
    max_images: int = 4
    max_image_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 40_000_000  # of the source image, before bounding to the model's max pixels
    allow_image_urls: bool = False
    url_timeout_s: float = 10.0


def _too_large(message: str, param: str) -> ApiError:
    return ApiError(413, message, param=param, code="request_too_large")


def _decode_data_uri(ref: ImageRef, limits: Limits) -> bytes:
    header, sep, payload = ref.url.partition(",")
    if not sep or not header.startswith("data:"):
        raise ApiError(400, f"{ref.where}: malformed data URI", param=ref.where)
    if not header.endswith(";base64"):
        raise ApiError(400, f"{ref.where}: data URIs must be base64-encoded", param=ref.where)
    if len(payload) * 3 // 4 > limits.max_image_bytes:
        raise _too_large(f"{ref.where}: image is over {limits.max_image_bytes} bytes", ref.where)
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


def _fetch(ref: ImageRef, limits: Limits) -> bytes:
    import http.client
    import ssl

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
                400, f"{ref.where}: fetching the image gave HTTP {response.status}", param=ref.where
            )
        data = response.read(limits.max_image_bytes + 1)
        conn.close()
    except (OSError, http.client.HTTPException) as err:
        raise ApiError(400, f"{ref.where}: cannot fetch the image ({err})", param=ref.where) from None
    if len(data) > limits.max_image_bytes:
        raise _too_large(f"{ref.where}: image is over {limits.max_image_bytes} bytes", ref.where)
    return data


def image_bytes(ref: ImageRef, limits: Limits) -> bytes:
    """The raw bytes of one image part (413 over the byte limit, 400 for anything not allowed)."""
    scheme = ref.url.split(":", 1)[0].lower() if ":" in ref.url else ""
    if scheme == "data":
        return _decode_data_uri(ref, limits)
    if scheme in ("http", "https"):
        if not limits.allow_image_urls:
            raise ApiError(
                400,
                f"{ref.where}: image URLs are off on this server (send a data: URI, or start qvq serve "
                "with --allow-image-urls)",
                param=ref.where,
                code="image_url_refused",
            )
        return _fetch(ref, limits)
    raise ApiError(
        400,
        f"{ref.where}: images must be data: URIs or http(s) URLs, not {scheme or 'a path'}",
        param=ref.where,
    )


def load_images(refs: list[ImageRef], limits: Limits, max_pixels: int | None) -> list:
    """Every image of a request as :class:`qvq_local.images.PreparedImage` (validated and bounded)."""
    from PIL import Image

    from qvq_local.errors import InputError
    from qvq_local.images import DEFAULT_MAX_PIXELS, PreparedImage, load_image

    if len(refs) > limits.max_images:
        raise _too_large(
            f"{len(refs)} images in one request; this server takes at most {limits.max_images}", "messages"
        )
    prepared = []
    with tempfile.TemporaryDirectory(prefix="qvq-serve-") as folder:
        for ref in refs:
            data = image_bytes(ref, limits)
            path = os.path.join(folder, f"image-{ref.index}")
            with open(path, "wb") as fh:
                fh.write(data)
            try:
                with Image.open(path) as probe:
                    width, height = probe.size
            except Exception:
                width = height = 0  # not an image: load_image says why, in its words
            if width * height > limits.max_image_pixels:
                raise _too_large(
                    f"{ref.where}: image is {width}x{height}, over {limits.max_image_pixels} pixels",
                    ref.where,
                )
            try:
                image, info = load_image(path, max_pixels or DEFAULT_MAX_PIXELS)
            except InputError as err:
                reason = str(err).split(": ", 1)[-1]
                raise ApiError(400, f"{ref.where}: {reason}", param=ref.where, code="invalid_image") from None
            info.path = f"image {ref.index + 1}"
            image.load()
            prepared.append(PreparedImage(image, info))
    return prepared
