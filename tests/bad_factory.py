"""Factories of bad inputs for tests/test_bad_inputs.py: broken and hostile files, answers.

Every factory takes the bytes (or path) of a good input and returns a damaged copy, so
that each case differs from a good input by exactly the fault it names.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import struct
from contextlib import contextmanager
from pathlib import Path

import numpy as np

BLOCK_MAGIC = b"\xd3BLK"


def digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (symbolic links not followed)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@contextmanager
def untouched(*folders: Path):
    """Assert that no file under ``folders`` is changed, added or removed by the block."""
    before = [digests(f) for f in folders]
    yield
    assert [digests(f) for f in folders] == before, "an input file was modified"


# -- model files --------------------------------------------------------------------------------
def block_offsets(data: bytes) -> list[int]:
    """Offsets of the ASDF blocks of ``data`` (walking the block headers)."""
    out, i = [], data.find(BLOCK_MAGIC)
    while i >= 0 and data[i : i + 4] == BLOCK_MAGIC:
        out.append(i)
        (header_size,) = struct.unpack(">H", data[i + 4 : i + 6])
        (allocated,) = struct.unpack(">Q", data[i + 14 : i + 22])
        i += 6 + header_size + allocated
    return out


def not_asdf(kind: str, rng: np.random.Generator) -> bytes:
    """Files that are not ASDF at all."""
    return {
        "fits": b"SIMPLE  =                    T / conforms to FITS standard" + b" " * 2822,
        "empty": b"",
        "random": rng.bytes(4096),
        "png": b"\x89PNG\r\n\x1a\n" + rng.bytes(200),
        "gzip": b"\x1f\x8b\x08\x00" + rng.bytes(200),
        "text": b"hello, this is a text file\n",
        "json": json.dumps({"roman": {"meta": {}}}).encode(),
        "yaml_only": b"%YAML 1.1\n---\nroman: {meta: {}}\n...\n",
        "asdf_lowercase": b"#asdf 1.0.0\n" + rng.bytes(100),
        "nul": b"\x00" * 1024,
    }[kind]


NOT_ASDF = ("fits", "empty", "random", "png", "gzip", "text", "json", "yaml_only",
            "asdf_lowercase", "nul")


def truncated(data: bytes, fraction: float) -> bytes:
    """``data`` cut at ``fraction`` of its length (never at its very end)."""
    return data[: max(1, min(len(data) - 1, int(len(data) * fraction)))]


def yaml_bomb(data: bytes, levels: int, width: int, where: bytes = b"  meta:\n") -> bytes:
    """A "billion laughs" mapping inserted after ``where``: width**levels nodes expanded."""
    indent = b" " * (len(where) - len(where.lstrip()) + 2)
    first = b", ".join([b"lol"] * width)
    lines = [indent + b"bomb0: &b0 [" + first + b"]\n"]
    for k in range(1, levels):
        refs = b", ".join([b"*b%d" % (k - 1)] * width)
        lines.append(indent + b"bomb%d: &b%d [%s]\n" % (k, k, refs))
    i = data.index(where) + len(where)
    return data[:i] + b"".join(lines) + data[i:]


def with_shape(data: bytes, shape: tuple[int, ...], nth: int = 0) -> bytes:
    """The shape of the ``nth`` array (ndarray) of the YAML header replaced by ``shape``."""
    header = data[: data.find(BLOCK_MAGIC)]
    matches = list(re.finditer(rb"byteorder: \w+\n\s+shape: \[([^\]\n]*)\]", header))
    m = matches[nth]
    new = b", ".join(str(s).encode() for s in shape)
    return data[: m.start(1)] + new + data[m.end(1) :]


def block_field(data: bytes, block: int, field: str, value: int) -> bytes:
    """One block header field (``header_size``, ``allocated``, ``used`` or ``data_size``) set."""
    offset, fmt = {
        "header_size": (4, ">H"),
        "allocated": (14, ">Q"),
        "used": (22, ">Q"),
        "data_size": (30, ">Q"),
    }[field]
    i = block_offsets(data)[block] + offset
    packed = struct.pack(fmt, value)
    return data[:i] + packed + data[i + len(packed) :]


def garbage_block(data: bytes, block: int) -> bytes:
    """The magic token of block ``block`` overwritten."""
    i = block_offsets(data)[block]
    return data[:i] + b"JUNK" + data[i + 4 :]


# -- service answers ----------------------------------------------------------------------------
def service_body(n: int, rng: np.random.Generator) -> bytes:
    """A well-formed CatalogSearch CSV answer of ``n`` rows."""
    lines = ["#Catalog GAIADR3 (bad-input factory)", "objID,ra,dec,mag,epoch,pmra,pmdec,parallax"]
    for i in range(n):
        lines.append(
            f"{1000 + i},{rng.uniform(0, 1):.9f},{rng.uniform(-1, 0):.9f},15.1,2016.0,"
            f"{rng.normal():.4f},{rng.normal():.4f},0.5"
        )
    return ("\n".join(lines) + "\n").encode()


def cut_after_comma(body: bytes, row: int) -> bytes:
    """``body`` cut right after the 3rd comma of data row ``row``: that row is short."""
    lines = body.split(b"\n")
    k = 2 + row  # a comment line and the header line come first
    line = lines[k]
    cut = [m.end() for m in re.finditer(b",", line)][2]
    return b"\n".join(lines[:k]) + b"\n" + line[:cut]


# -- file-system oddities -----------------------------------------------------------------------
#: Special files that are not regular files, by the words the errors use for them.
SPECIAL_KINDS = {
    "fifo": "a FIFO (named pipe)",
    "folder": "a folder",
    "dev_zero": "a character device",
    "dev_null": "a character device",
}


def special_file(folder: Path, name: str, kind: str) -> Path:
    """A FIFO (no writer), a folder, or a symbolic link to /dev/zero or /dev/null at
    ``folder / name``: what a test names where a regular file is expected."""
    path = folder / name
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero" if kind == "dev_zero" else "/dev/null")
    return path


def sparse_file(path: Path, size: int = 2 * 1024**3) -> Path:
    """A file of ``size`` NUL bytes that takes no disk space (a hole, ``truncate``)."""
    with path.open("wb") as f:
        f.truncate(size)
    return path


@contextmanager
def deadline(seconds: float):
    """Fail the block with TimeoutError after ``seconds`` (SIGALRM; main thread only): a
    read that blocks (a FIFO without a writer, /dev/zero) ends the test instead of hanging
    it.  The previous handler and timer are restored."""

    def _expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, _expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
