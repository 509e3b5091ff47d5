"""A succeeded job's output: one file, the listing (names, sizes, sha256), and the whole output as one tar
archive written while it is sent.

Only names that the job's result lists are served: no part of a URL ever reaches the filesystem as a path.
The archive is never built in memory or on disk: each member is a tar header (the standard library's
`TarInfo.tobuf`) followed by the file read in CHUNK_BYTES pieces, so its size is known before the first
byte goes out (Content-Length) and memory stays at one chunk whatever the model size.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field

from qaas.api.problems import Problem
from qaas.db.models import Job, JobStatus
from qaas.kit.file_digest import CHUNK_BYTES, sha256_file
from qaas.settings import Settings

BLOCK = tarfile.BLOCKSIZE
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)


@dataclass(frozen=True)
class OutputFile:
    name: str
    size: int
    path: Path
    #: As recorded when the job finished; None for results written before digests were recorded.
    sha256: str | None


def _not_found(detail: str) -> Problem:
    return Problem(404, "Not found", detail, slug="not-found")


def _served(settings: Settings, job: Job | None) -> list[dict]:
    """The result's file entries of the caller's job (None: not theirs): 404, or 409 before it succeeded."""
    if job is None:
        raise _not_found("no such job")
    if job.status != JobStatus.succeeded.value or not job.result:
        raise Problem(409, "No output", f"the job has no output files: it is {job.status}", slug="no-output")
    return list(job.result.get("files") or [])


def _on_disk(settings: Settings, job: Job, entry: dict) -> OutputFile:
    root = (settings.artifacts_dir / str(job.id)).resolve()
    path = (root / entry["name"]).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise _not_found(f"the job's output is no longer available ({entry['name']} is missing)")
    # the size on disk, not the recorded one: it is what the headers and the archive promise
    return OutputFile(entry["name"], path.stat().st_size, path, entry.get("sha256"))


def output_files(settings: Settings, job: Job | None) -> list[OutputFile]:
    """Every output file of the caller's job."""
    return [_on_disk(settings, job, e) for e in _served(settings, job)]


def output_file(settings: Settings, job: Job | None, name: str) -> OutputFile:
    """One output file of the caller's job, by a name its result lists."""
    for entry in _served(settings, job):
        if entry["name"] == name:
            return _on_disk(settings, job, entry)
    raise _not_found("no such file in this job's output")


class ListedFile(BaseModel):
    name: str
    size: int
    sha256: str
    url: str


class Archive(BaseModel):
    url: str = Field(description="GET it for every file in one tar, streamed")
    name: str = Field(description="the archive's file name; it extracts into a folder of the same name")
    size: int


class FileListing(BaseModel):
    items: list[ListedFile]
    archive: Archive


def listing(job: Job, files: list[OutputFile], base: str) -> FileListing:
    """GET .../files: every file with its size and sha256, and the archive of them all."""
    root = archive_root(job)
    return FileListing(
        items=[ListedFile(name=f.name, size=f.size, sha256=f.sha256 or sha256_file(f.path), url=f"{base}/files/{f.name}")
               for f in files],
        archive=Archive(url=f"{base}/files.tar", name=f"{root}.tar", size=archive_size(root, files)),
    )


def archive_root(job: Job) -> str:
    """The folder the archive extracts into: the model's name and the job's short id ('stories260K-1a2b3c4d')."""
    tail = re.sub(r"[^A-Za-z0-9._-]+", "-", job.source_model.rstrip("/").rsplit("/", 1)[-1]).strip(".-")
    return f"{tail or 'model'}-{str(job.id)[:8]}"


def _header(root: str, f: OutputFile) -> bytes:
    info = tarfile.TarInfo(f"{root}/{f.name}")
    info.size, info.mode, info.mtime = f.size, 0o644, int(f.path.stat().st_mtime)
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")


def _padding(size: int) -> int:
    return -size % BLOCK


def archive_size(root: str, files: list[OutputFile]) -> int:
    return sum(len(_header(root, f)) + f.size + _padding(f.size) for f in files) + len(END_OF_ARCHIVE)


def archive_chunks(root: str, files: list[OutputFile]) -> Iterator[bytes]:
    """The tar archive of `files` under `root/`, a header or at most CHUNK_BYTES of a file at a time."""
    for f in files:
        yield _header(root, f)
        left = f.size
        with open(f.path, "rb") as src:
            while left:
                chunk = src.read(min(CHUNK_BYTES, left))
                if not chunk:
                    # The file shrank after its header promised its size: end the response broken rather
                    # than send an archive whose members silently run into each other.
                    raise OSError(f"{f.path} shrank while it was being sent")
                left -= len(chunk)
                yield chunk
        if _padding(f.size):
            yield b"\0" * _padding(f.size)
    yield END_OF_ARCHIVE
