"""The IDX file format (LeCun's MNIST container), read with one ``np.frombuffer``.

Layout: two zero bytes, a dtype code, the number of dimensions ``ndim``, then
``ndim`` big-endian uint32 sizes, then the values in C order (big-endian when
wider than a byte). A file may be gzip-compressed; its magic bytes tell.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fedmq.errors import DataError

__all__ = ["load_idx", "parse_idx", "read_file"]

_GZIP_MAGIC = b"\x1f\x8b"
_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def load_idx(path: Path) -> npt.NDArray[Any]:
    """Read one IDX file, gzip-compressed or not, into a writable native-endian array.

    Raises ``DataError`` when the file cannot be read, is not valid gzip, has a
    bad magic number or dtype code, or holds more or fewer bytes than its
    header declares (a truncated download).
    """
    return parse_idx(read_file(path, md5=None), path)


def read_file(path: Path, *, md5: str | None) -> bytes:
    """The bytes of ``path``, decompressed if gzip; checks the MD5 of the file as stored."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if md5 is not None:
        actual = hashlib.md5(raw, usedforsecurity=False).hexdigest()
        if actual != md5:
            raise DataError(
                f"{path}: MD5 {actual} does not match the official {md5}; the file is "
                "corrupt or not the official one (download it again, or pass "
                "verify_checksums=False to skip the check)"
            )
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: not a valid gzip file ({exc})") from exc


def parse_idx(data: bytes, path: Path) -> npt.NDArray[Any]:
    """Decode IDX bytes; ``path`` only names the file in error messages."""
    if len(data) < 4 or data[:2] != b"\x00\x00":
        raise DataError(f"{path}: not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    code, ndim = data[2], data[3]
    dtype = _DTYPES.get(code)
    if dtype is None:
        known = ", ".join(f"0x{c:02X}" for c in _DTYPES)
        raise DataError(f"{path}: unknown IDX dtype code 0x{code:02X} (known: {known})")
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataError(f"{path}: IDX header truncated or declares {ndim} dimensions")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    count = math.prod(dims)
    expected, actual = count * dtype.itemsize, len(data) - header
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing bytes"
        raise DataError(
            f"{path}: {what}: header declares shape {dims} ({expected} bytes of data), "
            f"the file holds {actual}"
        )
    values = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(dims)
    # frombuffer over bytes is read-only; one copy makes it writable (torch.from_numpy
    # warns on read-only arrays) and converts big-endian values to native order.
    return values.astype(dtype.newbyteorder("="), copy=True)
