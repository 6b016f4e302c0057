"""A local Hugging Face hub for tests: real HTTP, the endpoints huggingface_hub 2.4 calls, nothing else.

Two servers on 127.0.0.1, as on the real hub: the "hub" answers ``GET /api/models/{repo}[/revision/{rev}]``
(repo info; with ``?blobs=true`` each file's size and, for LFS files, sha256) and ``HEAD``/``GET
/{repo}/resolve/{rev}/{path}`` (small files: 200 with ``ETag`` = git blob sha1 and ``X-Repo-Commit``; LFS
files: 302 to the "CDN" with ``X-Linked-Etag`` = sha256, ``X-Linked-Size``, ``X-Repo-Commit``); the "CDN"
(another port, so the client does not follow the redirect on HEAD, exactly as with the real hub's CDN)
serves blobs with ``Range`` support.  Errors carry the hub's ``X-Error-Code`` headers (``RepoNotFound``,
``GatedRepo``, ``EntryNotFound``, ``RevisionNotFound``), which huggingface_hub turns into its exceptions.

Faults for tests: ``drop_after[path] = [n1, n2]`` closes the connection after ``n1`` bytes of the first GET
of that file (counted from where the response starts), ``n2`` of the second, and so on;
``corrupt.add(path)`` serves that file with one byte flipped (its metadata keeps the true sha256).
``requests`` logs every request as ``(server, method, path, range)``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".gguf", ".safetensors", ".bin")


@dataclass
class Repo:
    files: dict[str, bytes]
    gated: bool = False
    sha: str = ""
    lfs: dict[str, str] = field(default_factory=dict)  # path -> sha256

    def __post_init__(self):
        digest = hashlib.sha1()
        for name in sorted(self.files):
            digest.update(name.encode() + hashlib.sha1(self.files[name]).digest())
            if name.endswith(LFS_SUFFIXES):
                self.lfs[name] = hashlib.sha256(self.files[name]).hexdigest()
        self.sha = digest.hexdigest()


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str, str | None]] = []
        self.drop_after: dict[str, list[int]] = {}
        self.corrupt: set[str] = set()
        self._lock = threading.Lock()
        self.hub = ThreadingHTTPServer(("127.0.0.1", 0), self._handler("hub"))
        self.cdn = ThreadingHTTPServer(("127.0.0.1", 0), self._handler("cdn"))
        self.hub.daemon_threads = self.cdn.daemon_threads = True
        self._threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (self.hub, self.cdn)]
        for t in self._threads:
            t.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.hub.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self.cdn.server_address[1]}"

    def add(self, repo_id: str, files: dict[str, bytes | Path], *, gated: bool = False) -> Repo:
        data = {k: (Path(v).read_bytes() if isinstance(v, Path) else v) for k, v in files.items()}
        repo = Repo(data, gated=gated)
        self.repos[repo_id] = repo
        return repo

    def close(self) -> None:
        for s in (self.hub, self.cdn):
            s.shutdown()
            s.server_close()

    def count(self, server: str | None = None) -> int:
        return sum(1 for r in self.requests if server in (None, r[0]))

    # ---------------------------------------------------------------- the handlers
    def _handler(self, server: str):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                self._serve(head=True)

            def do_GET(self):
                self._serve(head=False)

            def _serve(self, head: bool):
                path = unquote(urlsplit(self.path).path)
                with hub._lock:
                    hub.requests.append((server, self.command, path, self.headers.get("Range")))
                if server == "cdn":
                    return self._blob(path, head)
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
                    return self._tree("/".join(parts[2:4]), parts[5], "/".join(parts[6:]), head)
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    return self._info("/".join(parts[2:4]), parts[5] if len(parts) > 5 else "main", head)
                if len(parts) >= 5 and parts[2] == "resolve":
                    return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), head)
                return self._error(404, "EntryNotFound", head)

            def _error(self, status: int, code: str | None, head: bool):
                body = json.dumps({"error": code or "error"}).encode()
                self.send_response(status)
                if code:
                    self.send_header("X-Error-Code", code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _repo(self, repo_id: str, revision: str, head: bool) -> Repo | None:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._error(404, "RepoNotFound", head)
                    return None
                if repo.gated:
                    self._error(401, "GatedRepo", head)
                    return None
                if revision not in ("main", repo.sha):
                    self._error(404, "RevisionNotFound", head)
                    return None
                return repo

            def _info(self, repo_id: str, revision: str, head: bool):
                repo = self._repo(repo_id, revision, head)
                if repo is None:
                    return
                siblings = []
                for name, data in sorted(repo.files.items()):
                    row = {"rfilename": name, "size": len(data), "blobId": _git_blob_sha1(data)}
                    if name in repo.lfs:
                        row["lfs"] = {"size": len(data), "sha256": repo.lfs[name], "pointerSize": 134}
                    siblings.append(row)
                body = json.dumps(
                    {
                        "_id": repo.sha[:24],
                        "id": repo_id,
                        "sha": repo.sha,
                        "private": False,
                        "gated": False,
                        "disabled": False,
                        "siblings": siblings,
                        "tags": [],
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _json(self, data, head: bool):
                body = json.dumps(data).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _tree(self, repo_id: str, revision: str, under: str, head: bool):
                """``list_repo_tree(recursive=True)``: files (and their folders) with oid, size and LFS info."""
                repo = self._repo(repo_id, revision, head)
                if repo is None:
                    return
                rows, folders = [], set()
                for name, data in sorted(repo.files.items()):
                    if under and not name.startswith(under.rstrip("/") + "/"):
                        continue
                    parent = name.rpartition("/")[0]
                    while parent and parent not in folders:
                        folders.add(parent)
                        rows.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": parent})
                        parent = parent.rpartition("/")[0]
                    row = {"type": "file", "oid": _git_blob_sha1(data), "size": len(data), "path": name}
                    if name in repo.lfs:
                        row["lfs"] = {"oid": repo.lfs[name], "size": len(data), "pointerSize": 134}
                    rows.append(row)
                self._json(rows, head)

            def _resolve(self, repo_id: str, revision: str, name: str, head: bool):
                repo = self._repo(repo_id, revision, head)
                if repo is None:
                    return
                if name not in repo.files:
                    return self._error(404, "EntryNotFound", head)
                data = repo.files[name]
                if name in repo.lfs:
                    self.send_response(302)
                    self.send_header("Location", f"{hub.cdn_url}/{repo_id}/{repo.lfs[name]}/{name}")
                    self.send_header("X-Repo-Commit", repo.sha)
                    self.send_header("X-Linked-Etag", f'"{repo.lfs[name]}"')
                    self.send_header("X-Linked-Size", str(len(data)))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("X-Repo-Commit", repo.sha)
                self.send_header("ETag", f'"{_git_blob_sha1(data)}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            def _blob(self, path: str, head: bool):
                owner, name, sha, *rest = path.strip("/").split("/")
                repo = hub.repos.get(f"{owner}/{name}")
                fname = "/".join(rest)
                if repo is None or repo.lfs.get(fname) != sha:
                    return self._error(404, None, head)
                data = repo.files[fname]
                if fname in hub.corrupt:
                    data = data[:-1] + bytes([data[-1] ^ 0xFF])
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes=") and rng[6:].split("-")[0].isdigit():
                    start = int(rng[6:].split("-")[0])
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("ETag", f'"{sha}"')
                self.end_headers()
                if head:
                    return
                body = data[start:]
                cuts = hub.drop_after.get(fname)
                cut = cuts.pop(0) if cuts else None
                if cut is not None and cut < len(body):
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # the connection drops mid-file
                    return
                self.wfile.write(body)

        return Handler
