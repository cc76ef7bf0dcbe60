"""Durable file operations: a reader sees the old content or the new, never a mix."""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    """Write to a temp file beside ``path`` and rename it over ``path``.

    ``durable`` fsyncs the file and the directory too, so the new content survives a machine crash;
    without it, it survives only the writing process's death.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def append_line(path: Path, line: str) -> None:
    """Append one line with a single O_APPEND write, so concurrent writers never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line.rstrip("\n") + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        else:
            fsync_dir(path)
    fsync_dir(root)


def copy_and_hash(source: Path, target: Path) -> str:
    """Copy ``source`` to ``target`` and return its sha256 in the time of the slower of the two: the kernel
    copies (sendfile) while another thread hashes the source (hashlib releases the GIL). A copy through
    Python's own buffers, hashing each block on the way, measured twice as slow here."""
    with ThreadPoolExecutor(1) as hasher:
        digest = hasher.submit(sha256_file, source)
        shutil.copyfile(source, target)
        return digest.result()


def flush_in_background(root: Path) -> None:
    """Start writing ``root``'s files to disk (fsync_tree in a daemon thread), so that the durable write
    overlaps what comes next; a later fsync_tree of the same files only waits for what is left of it."""
    threading.Thread(target=_fsync_quietly, args=(root,), daemon=True, name=f"fsync {root}").start()


def _fsync_quietly(root: Path) -> None:
    with contextlib.suppress(OSError):  # moved away meanwhile (quarantined): whoever needs it durable fsyncs it
        fsync_tree(root)


def write_and_hash(source: BinaryIO, target: Path) -> str:
    """Write a stream (a download) into ``target`` and return its sha256 (the caller makes the file durable,
    with the rest of the version). Another thread hashes each block while this one reads and writes the next
    (hashlib, reads and writes release the GIL): the hash costs no time of its own."""
    blocks: queue.Queue[bytes | None] = queue.Queue(maxsize=16)
    with ThreadPoolExecutor(1) as hasher:
        digest = hasher.submit(_hash_blocks, blocks)
        try:
            with open(target, "wb") as sink:
                for block in iter(lambda: source.read(1 << 20), b""):
                    blocks.put(block)
                    sink.write(block)
        finally:
            blocks.put(None)  # the hasher ends, whatever happened here
        return digest.result()


def _hash_blocks(blocks: queue.Queue[bytes | None]) -> str:
    digest = hashlib.sha256()
    while (block := blocks.get()) is not None:
        digest.update(block)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
