"""Check an ASDF input file's structure before handing it to asdf, in bounded time and memory.

A broken or hostile file must fail fast, naming the file, rather than hang the run
or fail later with an error naming nothing.  :func:`check_asdf_file` reads only the
YAML header and the 54-byte block headers (never the pixel data) and refuses:

* a file that is not ASDF at all (e.g. a FITS file): it must start with ``#ASDF``;
* a YAML header larger than :data:`MAX_YAML_BYTES`, or one whose anchors and
  aliases expand to more than :data:`MAX_YAML_NODES` nodes (a "billion laughs"
  bomb, which would otherwise hang schema validation when the output is saved);
* a file cut short: a YAML header without its ``...`` end line, or a block that
  extends past the end of the file;
* a block that declares more than :data:`MAX_ARRAY_BYTES` once decompressed (a
  compression bomb), or an array whose declared shape needs more than that, or
  more bytes than its block holds.

The block layout is the one of the ASDF standard ("Blocks"): a ``\\xd3BLK`` magic
token, a big-endian ``uint16`` header size, then ``flags`` (``uint32``),
``compression`` (4 bytes), ``allocated_size``, ``used_size`` and ``data_size``
(``uint64`` each) and a 16-byte checksum, followed by ``allocated_size`` bytes.
"""

from __future__ import annotations

import math
import os
import re
import struct
from pathlib import Path

import numpy as np

from ._io import check_regular_file, open_regular
from .errors import InvalidInputError

__all__ = ["MAX_ARRAY_BYTES", "MAX_YAML_BYTES", "MAX_YAML_NODES", "check_asdf_file"]

#: Largest YAML header accepted (bytes): parsed in a few seconds; a Roman L2 header is
#: well under 1 MB.
MAX_YAML_BYTES = 16 * 2**20
#: Largest number of YAML nodes the header may expand to once aliases are followed.
MAX_YAML_NODES = 1_000_000
#: Largest array (declared, or a block decompressed) accepted, in bytes: 1 GiB, eight
#: times a 4096 x 4096 float64 array (a WFI L2 array is 4088 x 4088 float32, 67 MB).
MAX_ARRAY_BYTES = 2**30

_BLOCK_MAGIC = b"\xd3BLK"
_STREAMED = 0x1
_CHUNK = 1 << 20
_NDARRAY = re.compile(
    rb"!core/ndarray-1\.\d\.\d\n(?P<indent>[ ]+)source: (?P<source>-?\d+)\n"
    rb"(?P=indent)datatype: (?P<dtype>\w+)\n(?:(?P=indent)byteorder: \w+\n)?"
    rb"(?P=indent)shape: \[(?P<shape>[^\]\n]*)\]"
)
_SHAPE = re.compile(rb"\bshape: \[(?P<shape>[^\]\n]*)\]")
_ANCHOR = re.compile(rb"(?:^|[\s\[{,:-])&[^\s,\[\]{}]+")


def _human(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} bytes"  # pragma: no cover


def check_asdf_file(path: str | os.PathLike, what: str = "input file") -> None:
    """Refuse an ASDF file whose structure is broken or hostile (see the module docstring).

    Parameters
    ----------
    path : str or path-like
        The file.
    what : str
        What the file is, for messages (``input file``, ``association member``).

    Raises
    ------
    InvalidInputError
        Naming the file, what is wrong and what was expected; also when it is not a
        regular file (a folder, a FIFO, a device: ``is a FIFO (named pipe), not a
        regular file``), which is never opened.
    OSError
        When the file cannot be read at all (e.g. it does not exist).
    """
    path = Path(path)
    st = check_regular_file(path, what, InvalidInputError)
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key in _PASSED:
        return
    _check(path, what, st.st_size)
    if len(_PASSED) >= 4096:
        _PASSED.clear()
    _PASSED.add(key)


#: Files that passed, as (resolved path, size, mtime_ns, inode): the step reads each input
#: twice (its group from the header, then the model) and checks it once while it is
#: unchanged.  Only passed checks are remembered; a failed one is raised again each time.
_PASSED: set[tuple] = set()


def _check(path: Path, what: str, size: int) -> None:
    with open_regular(path, what, InvalidInputError) as f:
        head = f.read(64)
        if not head.startswith(b"#ASDF "):
            kind = " (a FITS file?)" if head.startswith(b"SIMPLE") else ""
            raise InvalidInputError(
                f"{path}: {what} is not an ASDF file{kind}: expected it to start with "
                f"'#ASDF 1.0.0', found {head[:30]!r}"
            )
        yaml_end = _find_blocks(f, path, size, what)
        f.seek(0)
        header = f.read(yaml_end)
    stripped = header.rstrip(b"\r\n\x00 ")
    if yaml_end == size and not stripped.endswith(b"\n..."):
        raise InvalidInputError(
            f"{path}: {what} is truncated or not a complete ASDF file: its YAML header does "
            "not end with the '...' line"
        )
    if _ANCHOR.search(header):
        _check_expansion(header, path, what)
    blocks = _read_blocks(path, yaml_end, size, what)
    _check_arrays(header, blocks, path, what)


def _find_blocks(f, path: Path, size: int, what: str) -> int:
    """Offset of the first block (or the file size when there are none)."""
    f.seek(0)
    offset, tail = 0, b""
    while True:
        chunk = f.read(_CHUNK)
        if not chunk:
            return size
        found = (tail + chunk).find(_BLOCK_MAGIC)
        if found >= 0:
            return offset - len(tail) + found
        if offset + len(chunk) > MAX_YAML_BYTES:
            raise InvalidInputError(
                f"{path}: {what} has a YAML header larger than {_human(MAX_YAML_BYTES)}; "
                "a Roman image's header is well under 1 MB"
            )
        offset += len(chunk)
        tail = chunk[-3:]


def _check_expansion(header: bytes, path: Path, what: str) -> None:
    """Count the nodes of the YAML tree with aliases followed, stopping at the limit.

    The count is made over the parser's events (libyaml's when available), without
    composing the tree: each scalar, sequence and mapping is one node, and an alias
    counts the nodes of the node it refers to, as many times as it is used (the size
    of an anchored node is known once its end event is read).  Three to four times
    faster than composing the tree and walking it (a Roman L2 header of about 2,700
    nodes: 2.3 ms against 8-10 ms), and nothing of the tree is kept.
    """
    import yaml
    from yaml.events import AliasEvent, CollectionEndEvent, CollectionStartEvent, ScalarEvent

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    sizes: dict[str, tuple[int, int]] = {}  # anchor -> (nodes, levels below it)
    stack: list[list] = []  # open collections: [anchor, nodes before it, deepest level in it]
    total = 0

    def duplicate(anchor) -> None:  # PyYAML's composer, hence asdf, refuses them too
        if anchor in sizes or any(entry[0] == anchor for entry in stack):
            raise InvalidInputError(
                f"{path}: {what} has an invalid YAML header: the anchor &{anchor} is "
                "defined twice"
            )

    try:
        for event in yaml.parse(header, Loader=loader):
            kind = type(event)
            deepest = len(stack)  # this node's level (the root's is 0)
            if getattr(event, "anchor", None) is not None and kind is not AliasEvent:
                duplicate(event.anchor)
            if kind is ScalarEvent:
                total += 1
                if event.anchor is not None:
                    sizes[event.anchor] = (1, 0)
            elif kind is AliasEvent:
                if event.anchor not in sizes:
                    reason = (
                        "refers to a node that contains it (a recursive structure)"
                        if any(entry[0] == event.anchor for entry in stack)
                        else "is not defined before it"
                    )
                    raise InvalidInputError(
                        f"{path}: {what} has an invalid YAML header: the alias "
                        f"*{event.anchor} {reason}"
                    )
                nodes, below = sizes[event.anchor]
                total += nodes
                deepest += below
            elif isinstance(event, CollectionStartEvent):
                total += 1
                stack.append([event.anchor, total - 1, deepest])
            elif isinstance(event, CollectionEndEvent):
                anchor, before, deepest = stack.pop()
                if anchor is not None:
                    sizes[anchor] = (total - before, deepest - len(stack))
            else:
                continue  # stream and document events
            if deepest > 500:
                raise InvalidInputError(
                    f"{path}: {what} has a YAML tree nested over 500 levels deep"
                )
            if stack and deepest > stack[-1][2]:
                stack[-1][2] = deepest
            if total > MAX_YAML_NODES:
                raise InvalidInputError(
                    f"{path}: {what} has a YAML header whose anchors and aliases expand to "
                    f"more than {MAX_YAML_NODES} nodes (a YAML bomb?); a Roman image's header "
                    "has a few thousand"
                )
    except yaml.YAMLError as err:
        raise InvalidInputError(f"{path}: {what} has an invalid YAML header: {err}") from err


def _read_blocks(path: Path, offset: int, size: int, what: str) -> list[tuple[int, bool]]:
    """``(data_size, streamed)`` of each block, checking that each lies inside the file."""
    blocks = []
    with path.open("rb") as f:
        while offset < size:
            f.seek(offset)
            head = f.read(6 + 48)
            if head.startswith(b"#ASDF"):  # the block index (optional; may be cut short)
                break
            if not head.startswith(_BLOCK_MAGIC):
                if not head.strip(b"\x00 \r\n"):
                    break  # padding at the end
                raise InvalidInputError(
                    f"{path}: {what} is corrupt: expected ASDF block {len(blocks)} at byte "
                    f"{offset}, found {head[:16]!r}"
                )
            if len(head) < 6 + 48:
                raise InvalidInputError(
                    f"{path}: {what} is truncated: block {len(blocks)} header at byte {offset} "
                    f"is cut short (the file has {size} bytes)"
                )
            (header_size,) = struct.unpack(">H", head[4:6])
            flags, _compression, allocated, used, data_size = struct.unpack(
                ">I4sQQQ", head[6:38]
            )
            if header_size < 48:
                raise InvalidInputError(
                    f"{path}: {what} is corrupt: block {len(blocks)} header size {header_size} "
                    "is under the 48 bytes of the ASDF standard"
                )
            streamed = bool(flags & _STREAMED)
            end = size if streamed else offset + 6 + header_size + allocated
            if end > size or (used > allocated and not streamed):
                raise InvalidInputError(
                    f"{path}: {what} is truncated: block {len(blocks)} at byte {offset} "
                    f"declares {allocated} bytes, the file ends {max(end - size, 0)} bytes "
                    "too early"
                )
            if data_size > MAX_ARRAY_BYTES:
                raise InvalidInputError(
                    f"{path}: {what} has a block ({len(blocks)}) that decompresses to "
                    f"{_human(data_size)}, more than the {_human(MAX_ARRAY_BYTES)} accepted "
                    f"per array (a compression bomb?; it holds {_human(used)})"
                )
            blocks.append((data_size, streamed))
            offset = end
    return blocks


def _ints(text: bytes) -> list[int] | None:
    try:
        return [int(v) for v in text.replace(b" ", b"").split(b",") if v]
    except ValueError:
        return None


def _check_arrays(header: bytes, blocks: list, path: Path, what: str) -> None:
    """Declared array sizes: under the limit and matching their blocks."""
    for m in _SHAPE.finditer(header):
        shape = _ints(m.group("shape"))
        if shape and min(shape) < 0:
            raise InvalidInputError(
                f"{path}: {what} declares an array of shape {tuple(shape)}: expected sizes >= 0"
            )
        if shape and math.prod(shape) > MAX_ARRAY_BYTES:
            raise InvalidInputError(
                f"{path}: {what} declares an array of shape {tuple(shape)}, more than the "
                f"{_human(MAX_ARRAY_BYTES)} accepted per array"
            )
    for m in _NDARRAY.finditer(header):
        shape, source = _ints(m.group("shape")), int(m.group("source"))
        try:
            itemsize = np.dtype(m.group("dtype").decode()).itemsize
        except TypeError:
            continue
        if source >= len(blocks):
            raise InvalidInputError(
                f"{path}: {what} is truncated: an array of shape {tuple(shape or ())} is in "
                f"block {source}, but the file has {len(blocks)} block(s)"
            )
        if shape is None or source < 0 or blocks[source][1]:
            continue
        need = math.prod(shape) * itemsize
        if need > MAX_ARRAY_BYTES:
            raise InvalidInputError(
                f"{path}: {what} declares an array of shape {tuple(shape)} "
                f"({_human(need)}), more than the {_human(MAX_ARRAY_BYTES)} accepted per array"
            )
        if need > blocks[source][0]:
            raise InvalidInputError(
                f"{path}: {what} declares an array of shape {tuple(shape)} "
                f"({m.group('dtype').decode()}, {need} bytes) in block {source}, which holds "
                f"only {blocks[source][0]} bytes"
            )
