"""Readers of file headers that check a file before anything trusts it: safetensors headers and ``.npz`` members
(sizes and offsets against the file, without reading a tensor), image and video frame sizes (from the header,
before decoding), each refusing with an error that names the file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

MAX_ARRAY_BYTES = 1 << 40  # 1 TiB: no single array dtx reads may declare more, whatever the file size
MAX_HEADER_BYTES = 100 << 20  # safetensors' own header limit
MAX_IMAGE_PIXELS = 1 << 26  # 67M pixels (8192 x 8192): larger images are refused from their header, before decoding
MAX_IMAGE_SIDE = 16384  # longest side of an image or video frame, in pixels
MAX_ASPECT_RATIO = 64  # long side / short side: a centre crop of anything flatter needs a huge intermediate


def safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed header of a safetensors file, checked without reading any tensor: its length fits the file and
    ``MAX_HEADER_BYTES``; every tensor has a known dtype, a non-negative shape whose byte size equals its offsets,
    lies inside the file and is at most ``MAX_ARRAY_BYTES``. Raises ``DataError`` naming the file."""
    import json
    import struct

    from .errors import DataError

    path = Path(path)
    itemsize = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise DataError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise DataError(f"{path}: safetensors header of {n} bytes does not fit the file ({size} bytes)")
            header = json.loads(f.read(n))
    except DataError:
        raise
    except (OSError, ValueError, RecursionError) as exc:
        raise DataError(f"{path}: not a readable safetensors file ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise DataError(f"{path}: safetensors header is not a mapping")
    data = size - 8 - n
    for name, meta in header.items():
        if name == "__metadata__":
            if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
                raise DataError(f"{path}: safetensors metadata must map names to strings")
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], meta["shape"], meta["data_offsets"]
            count = 1
            for d in shape:
                if not isinstance(d, int) or d < 0:
                    raise ValueError(d)
                count *= d
            nbytes = count * itemsize[dtype]
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{path}: tensor {name!r} has a malformed safetensors entry") from None
        if nbytes > MAX_ARRAY_BYTES or not (isinstance(begin, int) and isinstance(end, int)
                                           and 0 <= begin <= end <= data and end - begin == nbytes):
            raise DataError(f"{path}: tensor {name!r} declares {nbytes} bytes that its file does not hold")
    return header


def npz_members(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], Any]]:
    """``{name: (shape, dtype)}`` of every array in an ``.npz``, read from the member headers only: each array's
    declared size must fit its member's stored size and ``MAX_ARRAY_BYTES``, so ``np.load`` of the archive
    allocates no more than the file holds (compressed members: no more than their declared uncompressed size).
    Raises ``DataError`` naming the file and array; a file that is no zip archive raises the reader's own error
    (``zipfile.BadZipFile``, ``OSError``, ``ValueError``) for the caller to word."""
    import zipfile

    import numpy as np

    from .errors import DataError

    path = Path(path)
    out: dict[str, tuple[tuple[int, ...], Any]] = {}
    with zipfile.ZipFile(path) as archive:
        for member in archive.infolist():
            if not member.filename.endswith(".npy"):
                continue
            name = member.filename[:-4]
            if member.file_size > MAX_ARRAY_BYTES:
                raise DataError(f"{path}: array {name!r} is {member.file_size} bytes, over the "
                                f"{MAX_ARRAY_BYTES} byte limit")
            with archive.open(member) as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f, max_header_size=10000)
                start = f.tell()
            if dtype.hasobject:
                raise DataError(f"{path}: array {name!r} holds Python objects; only plain arrays are read")
            count = 1
            for d in shape:
                count *= int(d)
            nbytes = count * dtype.itemsize
            if nbytes > member.file_size - start or nbytes > MAX_ARRAY_BYTES:
                raise DataError(f"{path}: array {name!r} declares shape {tuple(shape)} ({nbytes} bytes) but "
                                f"its file holds {member.file_size - start} bytes")
            out[name] = (tuple(int(d) for d in shape), dtype)
    return out


def check_frame_size(width: int, height: int, path: str | os.PathLike) -> None:
    """Refuse an image or video frame of ``width x height`` read from a header, before decoding, naming the file:
    over ``MAX_IMAGE_PIXELS``, a side over ``MAX_IMAGE_SIDE`` or an aspect ratio over ``MAX_ASPECT_RATIO``."""
    from .errors import DataError

    size = f"{path}: {width}x{height} pixels"
    if min(width, height) < 1:
        raise DataError(f"{size} has an empty side")
    if max(width, height) > MAX_IMAGE_SIDE:
        raise DataError(f"{size} has a side over the {MAX_IMAGE_SIDE} pixel limit")
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(f"{size} is over the {MAX_IMAGE_PIXELS} pixel limit")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise DataError(f"{size} is over the {MAX_ASPECT_RATIO}:1 aspect ratio limit")


def check_image_size(image: Any, path: str | os.PathLike) -> None:
    """Refuse an opened (not yet decoded) PIL image beyond the limits of ``check_frame_size``, naming the file."""
    check_frame_size(image.width, image.height, path)


def gif_size(path: str | os.PathLike) -> tuple[int, int]:
    """The size of the frames a GIF decodes to, from its block headers without decoding: the logical screen grown to
    every frame's extent, as PIL composes them. Raises ``DataError`` naming the file when the blocks are malformed."""
    import struct

    from .errors import DataError

    def skip_sub_blocks(f: Any) -> None:
        while (n := f.read(1)) and n[0]:
            f.seek(n[0], os.SEEK_CUR)

    with open(path, "rb") as f:
        head = f.read(13)
        if len(head) < 13 or head[:6] not in (b"GIF87a", b"GIF89a"):
            raise DataError(f"{path}: not a GIF file")
        width, height, flags = struct.unpack("<HHB", head[6:11])
        if flags & 0x80:  # global colour table
            f.seek(3 << ((flags & 7) + 1), os.SEEK_CUR)
        frames = 0
        while (block := f.read(1)) not in (b"", b";"):  # trailer (a truncated file ends there for PIL too)
            if block == b"!":  # extension: label, then sub-blocks
                f.read(1)
                skip_sub_blocks(f)
            elif block == b",":  # image descriptor: left, top, width, height, flags
                desc = f.read(9)
                if len(desc) < 9:
                    break
                left, top, w, h, flags = struct.unpack("<HHHHB", desc)
                width, height, frames = max(width, left + w), max(height, top + h), frames + 1
                if flags & 0x80:  # local colour table
                    f.seek(3 << ((flags & 7) + 1), os.SEEK_CUR)
                f.read(1)  # LZW minimum code size
                skip_sub_blocks(f)
            else:
                raise DataError(f"{path}: malformed GIF (unknown block {block!r} at byte {f.tell() - 1})")
    if not frames:
        raise DataError(f"{path}: GIF without frames")
    return width, height


# -- files named on the command line ------------------------------------------------------------------------------------
