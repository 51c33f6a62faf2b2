"""Memory-mapped, bounds-checked GGUF reader.

In:  a path to a GGUF v2/v3 little-endian file.
Out: a :class:`GGUFFile` holding the metadata (parsed eagerly into Python values), one
     :class:`TensorInfo` per tensor, and the open read-only mmap; ``tensor_data`` hands
     out zero-copy ``uint8`` views into it for the dequant / weight-mapping stage.
Ownership: the ``GGUFFile`` owns the mmap; ``close()`` releases it (views already handed
     out keep the mapping alive until they are dropped).

All validation happens in :func:`read_gguf`.  Every count and length read from the file
is checked against the bytes that remain *before* anything is allocated or looped over,
so a malformed or hostile file raises :class:`GGUFFormatError` (naming the field and its
byte offset) in milliseconds: never ``IndexError``/``struct.error``/``MemoryError``, a
hang or a huge allocation.

File layout (all little-endian)::

    "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count     x ( string key | u32 value_type | value )
    tensor_count x ( string name | u32 n_dims | n_dims x u64 dim | u32 ggml_type | u64 offset )
    zero padding up to `general.alignment` (default 32) | tensor data (offsets relative to here)

    string = u64 byte length + UTF-8 bytes;  array = u32 element type + u64 count + elements
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from math import prod
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from rocmforge.errors import GGUFError, GGUFFormatError, GGUFUnsupportedError

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 20
MAX_DIMS = 4
_INT64_MAX = 2**63 - 1
_HEADER_BYTES = 24  # magic + version + tensor_count + kv_count
# Smallest possible encodings, used to bound counts before looping over them.
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length + 1-byte key + value type + 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name len + name + n_dims + 1 dim + type + offset
_MIN_STRING_BYTES = 8

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class _Scalar(NamedTuple):
    codec: struct.Struct  # for a single value
    dtype: str  # numpy dtype for an array of them (same width)


_SCALARS: dict[GGUFValueType, _Scalar] = {
    GGUFValueType.UINT8: _Scalar(struct.Struct("<B"), "<u1"),
    GGUFValueType.INT8: _Scalar(struct.Struct("<b"), "<i1"),
    GGUFValueType.UINT16: _Scalar(struct.Struct("<H"), "<u2"),
    GGUFValueType.INT16: _Scalar(struct.Struct("<h"), "<i2"),
    GGUFValueType.UINT32: _Scalar(struct.Struct("<I"), "<u4"),
    GGUFValueType.INT32: _Scalar(struct.Struct("<i"), "<i4"),
    GGUFValueType.FLOAT32: _Scalar(struct.Struct("<f"), "<f4"),
    GGUFValueType.BOOL: _Scalar(struct.Struct("<B"), "<u1"),  # must be 0 or 1
    GGUFValueType.UINT64: _Scalar(struct.Struct("<Q"), "<u8"),
    GGUFValueType.INT64: _Scalar(struct.Struct("<q"), "<i8"),
    GGUFValueType.FLOAT64: _Scalar(struct.Struct("<d"), "<f8"),
}
_VALUE_TYPES: dict[int, GGUFValueType] = {int(t): t for t in GGUFValueType}
_QUANT_SIZES: dict[int, tuple[int, int]] = {int(t): size for t, size in GGML_QUANT_SIZES.items()}


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lives in the file and how it is encoded."""

    name: str
    dims: tuple[int, ...]  # GGUF order: dims[0] is the contiguous (fastest-varying) dimension
    ggml_type: GGMLQuantizationType
    offset: int  # absolute byte offset of the tensor data in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Row-major (torch/numpy) shape: the GGUF dims reversed."""
        return tuple(reversed(self.dims))

    @property
    def n_elements(self) -> int:
        return prod(self.dims)


READ_CHUNK = 16 << 20
"""Bytes per positioned read of :meth:`GGUFFile.read_tensor_into`."""
READ_THREADS = 4
"""Most threads one tensor is read with (measured on 2 cores: a 1.1 GB file in 0.3 s with
two, 0.5-1.5 s with one)."""


class GGUFFile:
    """A parsed GGUF file over an open read-only mmap (and a descriptor of the same
    open file, for :meth:`read_tensor_into`).

    Built by :func:`read_gguf` from already-validated parts; usable as a context manager.
    """

    def __init__(
        self,
        *,
        path: Path,
        mapping: mmap.mmap,
        version: int,
        alignment: int,
        data_offset: int,
        metadata: dict[str, Any],
        metadata_types: dict[str, tuple[GGUFValueType, ...]],
        tensors: dict[str, TensorInfo],
        fd: int | None = None,
    ) -> None:
        self.path = path
        self.version = version
        self.alignment = alignment
        self.data_offset = data_offset
        self.metadata = metadata
        self.metadata_types = metadata_types
        self.tensors = tensors
        self._mapping: mmap.mmap | None = mapping
        self._fd = fd

    def tensor_data(self, name: str) -> np.ndarray:
        """The raw bytes of tensor ``name``: a 1-D read-only ``uint8`` view into the mmap."""
        info = self.tensors.get(name)
        if info is None:
            raise GGUFError(f"{self.path}: no tensor named {name!r}", param=name)
        if self._mapping is None:
            raise GGUFError(f"{self.path}: file is closed")
        return np.frombuffer(self._mapping, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def read_tensor_into(self, name: str, out: np.ndarray) -> None:
        """Read tensor ``name``'s bytes into ``out`` (C-contiguous ``uint8`` of exactly its
        size) by positioned reads of the file: a copy of its own that never passes through
        the mapping, so none of the file's pages count in this process's memory."""
        info = self.tensors.get(name)
        if info is None:
            raise GGUFError(f"{self.path}: no tensor named {name!r}", param=name)
        if self._fd is None:
            raise GGUFError(f"{self.path}: file is closed")
        if out.dtype != np.uint8 or out.nbytes != info.nbytes or not out.flags.c_contiguous:
            raise ValueError(f"need a contiguous uint8 buffer of {info.nbytes} bytes for {name!r}")
        view = memoryview(out.data).cast("B")
        fd = self._fd

        def read(start: int) -> None:
            end, done = min(info.nbytes, start + READ_CHUNK), start
            while done < end:
                count = os.preadv(fd, [view[done:end]], info.offset + done)
                if count == 0:
                    raise GGUFFormatError(f"file ends inside tensor {name!r} (was it truncated while open?)",
                                          field=name, offset=info.offset + done, path=str(self.path))
                done += count

        starts = range(0, info.nbytes, READ_CHUNK)
        if len(starts) == 1:
            read(0)
            return
        # Big tensors in chunks on a few threads (preadv releases the GIL): the copy out of
        # the page cache and the first touch of the new pages go about twice as fast.
        with ThreadPoolExecutor(min(READ_THREADS, len(starts))) as pool:
            list(pool.map(read, starts))

    def close(self) -> None:
        """Release the mmap and the descriptor. Views from ``tensor_data`` stay valid and
        keep the mapping alive."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        mapping, self._mapping = self._mapping, None
        if mapping is None:
            return
        try:
            mapping.close()
        except BufferError:
            # numpy/torch views still export the buffer; the mapping goes when they do.
            logger.debug("%s: tensor views still alive, mmap released when they are", self.path)

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"GGUFFile({str(self.path)!r}, version={self.version}, "
            f"{len(self.metadata)} metadata keys, {len(self.tensors)} tensors)"
        )


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Open, map and fully validate a GGUF file.

    Raises :class:`GGUFError` when the file cannot be opened, :class:`GGUFFormatError`
    when it is malformed and :class:`GGUFUnsupportedError` for a version or tensor type
    this reader does not handle.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                raise GGUFFormatError("file is empty", field="magic", offset=0, path=str(path))
            mapping = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            fd = os.dup(fh.fileno())
    except OSError as exc:
        raise GGUFError(f"cannot open GGUF file {path}: {exc.strerror or exc}") from exc
    start = time.perf_counter()
    try:
        gguf_file = _parse(_Cursor(mapping, str(path)), path, mapping, fd)
    except BaseException:  # close the mapping and descriptor whatever went wrong, then re-raise
        mapping.close()
        os.close(fd)
        raise
    logger.debug("parsed %r in %.3f s", gguf_file, time.perf_counter() - start)
    return gguf_file


class _Cursor:
    """Reads little-endian fields from the mapping, checking each read against the end."""

    __slots__ = ("buf", "pos", "end", "path")

    def __init__(self, buf: mmap.mmap, path: str) -> None:
        self.buf = buf
        self.pos = 0
        self.end = len(buf)
        self.path = path

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def fail(self, message: str, field: str, offset: int | None = None) -> GGUFFormatError:
        at = self.pos if offset is None else offset
        return GGUFFormatError(message, field=field, offset=at, path=self.path)

    def unsupported(self, message: str, field: str, offset: int) -> GGUFUnsupportedError:
        text = f"{self.path}: {message} (field {field!r} at byte offset {offset})"
        return GGUFUnsupportedError(text, field=field, offset=offset, path=self.path)

    def need(self, n: int, field: str) -> None:
        if n > self.remaining:
            raise self.fail(f"file truncated: need {n} bytes, {self.remaining} remain", field)

    def u32(self, field: str) -> int:
        self.need(4, field)
        (value,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return value

    def u64(self, field: str) -> int:
        self.need(8, field)
        (value,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return value

    def string(self, field: str) -> str:
        start = self.pos
        length = self.u64(field)
        if length > self.remaining:
            message = f"string length {length} runs past end of file ({self.remaining} left)"
            raise self.fail(message, field, start)
        raw = self.buf[self.pos : self.pos + length]
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"invalid UTF-8 in string: {exc.reason}", field, start) from exc

    def string_array(self, count: int, field: str) -> list[str]:
        """``count`` strings; the hot loop for token and merge lists (~100k strings)."""
        buf, pos, end, unpack = self.buf, self.pos, self.end, _U64.unpack_from
        out: list[str] = []
        append = out.append
        for i in range(count):
            if end - pos < 8:
                raise self.fail("file truncated inside string length", f"{field} [{i}]", pos)
            (length,) = unpack(buf, pos)
            if length > end - pos - 8:
                raise self.fail(f"string length {length} past end of file", f"{field} [{i}]", pos)
            try:
                append(buf[pos + 8 : pos + 8 + length].decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise self.fail(f"invalid UTF-8: {exc.reason}", f"{field} [{i}]", pos) from exc
            pos += 8 + length
        self.pos = pos
        return out

    def scalar(self, vtype: GGUFValueType, field: str) -> int | float | bool:
        codec = _SCALARS[vtype].codec
        self.need(codec.size, field)
        (value,) = codec.unpack_from(self.buf, self.pos)
        if vtype is GGUFValueType.BOOL:
            if value > 1:
                raise self.fail(f"bool value must be 0 or 1, got {value}", field)
            value = bool(value)
        self.pos += codec.size
        return value

    def numeric_array(self, etype: GGUFValueType, count: int, field: str) -> list[Any]:
        """``count`` scalars; the caller has checked they fit in the remaining bytes."""
        codec, dtype = _SCALARS[etype]
        nbytes = count * codec.size
        values = np.frombuffer(self.buf[self.pos : self.pos + nbytes], dtype=dtype)
        if etype is GGUFValueType.BOOL:
            bad = np.flatnonzero(values > 1)
            if bad.size:
                i = int(bad[0])
                message = f"bool value must be 0 or 1, got {values[i]}"
                raise self.fail(message, f"{field} [{i}]", self.pos + i)
            values = values.astype(bool)
        self.pos += nbytes
        return values.tolist()

    def value_type(self, field: str) -> GGUFValueType:
        start = self.pos
        raw = self.u32(field)
        vtype = _VALUE_TYPES.get(raw)
        if vtype is None:
            raise self.fail(f"unknown value type {raw}", field, start)
        return vtype


def _parse(cur: _Cursor, path: Path, mapping: mmap.mmap, fd: int) -> GGUFFile:
    """Parse and validate everything; returns the finished ``GGUFFile``."""
    cur.need(4, "magic")
    magic = cur.buf[0:4]
    if magic != GGUF_MAGIC:
        raise cur.fail(f"bad magic {magic!r}, expected {GGUF_MAGIC!r}: not a GGUF file", "magic")
    cur.pos = 4
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        message = f"GGUF version {version} is not supported (only 2 and 3)"
        if version >= 1 << 16:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            message += (
                f"; the file looks big-endian (byte-swapped version {swapped}),"
                " only little-endian GGUF is supported"
            )
        raise cur.unsupported(message, "version", 4)
    tensor_count = cur.u64("tensor_count")
    if tensor_count * _MIN_TENSOR_INFO_BYTES > cur.remaining:
        message = f"tensor_count {tensor_count} is more than the file could hold"
        raise cur.fail(message, "tensor_count", 8)
    kv_count = cur.u64("kv_count")
    if kv_count * _MIN_KV_BYTES > cur.remaining - tensor_count * _MIN_TENSOR_INFO_BYTES:
        raise cur.fail(f"kv_count {kv_count} is more than the file could hold", "kv_count", 16)

    metadata: dict[str, Any] = {}
    metadata_types: dict[str, tuple[GGUFValueType, ...]] = {}
    alignment = DEFAULT_ALIGNMENT
    for index in range(kv_count):
        key_field, key_offset = f"metadata key #{index}", cur.pos
        key = cur.string(key_field)
        if not key:
            raise cur.fail("empty metadata key", key_field, key_offset)
        if key in metadata:
            raise cur.fail(f"duplicate metadata key {key!r}", key_field, key_offset)
        value_offset = cur.pos
        metadata[key], metadata_types[key] = _read_value(cur, key)
        if key == "general.alignment":
            alignment = _check_alignment(cur, metadata[key], metadata_types[key], value_offset)

    names: set[str] = set()
    infos = [_read_tensor_info(cur, index, alignment, names) for index in range(tensor_count)]
    data_offset = -(-cur.pos // alignment) * alignment
    tensors = _place_tensors(cur, infos, data_offset)
    return GGUFFile(
        path=path, mapping=mapping, fd=fd, version=version, alignment=alignment,
        data_offset=data_offset, metadata=metadata, metadata_types=metadata_types,
        tensors=tensors,
    )  # fmt: skip


def _read_value(cur: _Cursor, key: str) -> tuple[Any, tuple[GGUFValueType, ...]]:
    """One metadata value (after its key): the Python value and its type tuple."""
    field = f"metadata {key!r}"
    vtype = cur.value_type(f"{field} type")
    if vtype is GGUFValueType.STRING:
        return cur.string(field), (vtype,)
    if vtype is not GGUFValueType.ARRAY:
        return cur.scalar(vtype, field), (vtype,)

    etype_field, etype_offset = f"{field} element type", cur.pos
    etype = cur.value_type(etype_field)
    if etype is GGUFValueType.ARRAY:
        raise cur.unsupported("nested arrays are not supported", etype_field, etype_offset)
    length_offset = cur.pos
    count = cur.u64(f"{field} length")
    min_size = _MIN_STRING_BYTES if etype is GGUFValueType.STRING else _SCALARS[etype].codec.size
    if count * min_size > cur.remaining:
        raise cur.fail(
            f"array of {count} {etype.name} runs past end of file "
            f"(needs at least {count * min_size} bytes, {cur.remaining} left)",
            f"{field} length",
            length_offset,
        )
    if etype is GGUFValueType.STRING:
        return cur.string_array(count, field), (vtype, etype)
    return cur.numeric_array(etype, count, field), (vtype, etype)


def _check_alignment(
    cur: _Cursor, value: Any, types: tuple[GGUFValueType, ...], offset: int
) -> int:
    """The validated ``general.alignment``; ``offset`` is where its value type field starts."""
    field = "metadata 'general.alignment'"
    if types != (GGUFValueType.UINT32,):
        raise cur.fail(f"general.alignment must be a UINT32, got {types[-1].name}", field, offset)
    if value <= 0 or value & (value - 1) or value > MAX_ALIGNMENT:
        raise cur.fail(
            f"general.alignment {value} must be a power of two between 1 and {MAX_ALIGNMENT}",
            field,
            offset + 4,
        )
    return int(value)


class _RawTensorInfo(NamedTuple):
    name: str
    dims: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    relative_offset: int
    nbytes: int
    offset_field: int  # byte offset of the tensor's offset field, for error messages


def _read_tensor_info(
    cur: _Cursor, index: int, alignment: int, names: set[str]
) -> _RawTensorInfo:
    """One tensor info record, validated on its own (placement is checked later).

    ``names`` holds the names read so far; this one is added to it.
    """
    name_field, name_offset = f"tensor #{index} name", cur.pos
    name = cur.string(name_field)
    if not name:
        raise cur.fail("empty tensor name", name_field, name_offset)
    if name in names:
        raise cur.fail(f"duplicate tensor name {name!r}", name_field, name_offset)
    names.add(name)
    field = f"tensor {name!r}"
    n_dims_offset = cur.pos
    n_dims = cur.u32(f"{field} n_dims")
    if not 1 <= n_dims <= MAX_DIMS:
        message = f"n_dims {n_dims} must be between 1 and {MAX_DIMS}"
        raise cur.fail(message, f"{field} n_dims", n_dims_offset)
    dims_offset = cur.pos
    cur.need(8 * n_dims, f"{field} dims")
    dims = struct.unpack_from(f"<{n_dims}Q", cur.buf, cur.pos)
    cur.pos += 8 * n_dims
    if min(dims) == 0 or prod(dims) > _INT64_MAX:
        message = f"dims {list(dims)} must be positive with a product below 2**63"
        raise cur.fail(message, f"{field} dims", dims_offset)

    type_offset = cur.pos
    raw_type = cur.u32(f"{field} type")
    if raw_type not in _QUANT_SIZES:
        message = f"unknown ggml tensor type {raw_type}"
        raise cur.unsupported(message, f"{field} type", type_offset)
    ggml_type = GGMLQuantizationType(raw_type)
    block_size, type_size = _QUANT_SIZES[raw_type]
    if dims[0] % block_size:
        message = f"row size {dims[0]} is not a multiple of {ggml_type.name} blocks ({block_size})"
        raise cur.fail(message, f"{field} dims", dims_offset)
    offset_field = cur.pos
    relative_offset = cur.u64(f"{field} offset")
    if relative_offset % alignment:
        message = f"data offset {relative_offset} is not a multiple of the alignment {alignment}"
        raise cur.fail(message, f"{field} offset", offset_field)
    nbytes = prod(dims) // block_size * type_size
    return _RawTensorInfo(name, dims, ggml_type, relative_offset, nbytes, offset_field)


def _place_tensors(
    cur: _Cursor, infos: list[_RawTensorInfo], data_offset: int
) -> dict[str, TensorInfo]:
    """Check every data range lies inside the file and none overlap; absolute offsets out."""
    tensors: dict[str, TensorInfo] = {}
    for info in infos:
        field = f"tensor {info.name!r} offset"
        start = data_offset + info.relative_offset
        if info.nbytes > cur.end - start:
            raise cur.fail(
                f"tensor data [{start}, {start + info.nbytes}) extends past the end of the file "
                f"({cur.end} bytes): the file looks truncated (incomplete download?)",
                field,
                info.offset_field,
            )
        tensors[info.name] = TensorInfo(info.name, info.dims, info.ggml_type, start, info.nbytes)

    by_start = sorted(infos, key=lambda info: info.relative_offset)
    for prev, info in zip(by_start, by_start[1:]):
        if info.relative_offset < prev.relative_offset + prev.nbytes:
            message = f"tensor data overlaps tensor {prev.name!r}"
            raise cur.fail(message, f"tensor {info.name!r} offset", info.offset_field)
    return tensors
