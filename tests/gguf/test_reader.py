"""Tests for the hardened GGUF reader.

Well-formed files come from ``gguf.GGUFWriter``; malformed ones are assembled byte by byte
with the helpers below so that any single field can be corrupted.  The real default model
is checked against ``gguf.GGUFReader`` (the reference implementation) when present.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quantize
from hypothesis import given, settings
from hypothesis import strategies as st

from rocmforge.errors import GGUFError, GGUFFormatError, GGUFUnsupportedError
from rocmforge.gguf import GGUFFile, TensorInfo, read_gguf

VT = GGUFValueType
QT = GGMLQuantizationType

# --- byte-level builders --------------------------------------------------------------


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def gstr(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return u64(len(raw)) + raw


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + u32(vtype) + payload


def tinfo(name: str, dims: tuple[int, ...], ggml_type: int = QT.F32, offset: int = 0) -> bytes:
    encoded_dims = b"".join(u64(d) for d in dims)
    return gstr(name) + u32(len(dims)) + encoded_dims + u32(ggml_type) + u64(offset)


def header(n_tensors: int, n_kv: int, version: int = 3) -> bytes:
    return b"GGUF" + u32(version) + u64(n_tensors) + u64(n_kv)


def gguf_bytes(
    kvs: Sequence[bytes] = (),
    infos: Sequence[bytes] = (),
    data: bytes = b"",
    *,
    alignment: int = 32,
    version: int = 3,
) -> bytes:
    """A complete file: header, KVs, tensor infos, zero padding to ``alignment``, data."""
    head = header(len(infos), len(kvs), version) + b"".join(kvs) + b"".join(infos)
    return head + bytes(-len(head) % alignment) + data


ARCH_KV = kv("general.architecture", VT.STRING, gstr("llama"))  # 45 bytes
KV0 = 24  # the first KV (or tensor info when there are no KVs) starts after the header


def write(tmp_path: Path, data: bytes, name: str = "t.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --- well-formed files (GGUFWriter) ----------------------------------------------------

SCALARS: list[tuple[str, Any, GGUFValueType]] = [
    ("t.u8", 255, VT.UINT8),
    ("t.i8", -128, VT.INT8),
    ("t.u16", 65535, VT.UINT16),
    ("t.i16", -32768, VT.INT16),
    ("t.u32", 2**32 - 1, VT.UINT32),
    ("t.i32", -(2**31), VT.INT32),
    ("t.f32", 1.5, VT.FLOAT32),
    ("t.bool", True, VT.BOOL),
    ("t.str", "héllo ✓", VT.STRING),
    ("t.u64", 2**64 - 1, VT.UINT64),
    ("t.i64", -(2**63), VT.INT64),
    ("t.f64", 0.1, VT.FLOAT64),
]
ARRAYS: list[tuple[str, list[Any], GGUFValueType]] = [
    ("a.u8", [0, 1, 255], VT.UINT8),
    ("a.i16", [-5, 7], VT.INT16),
    ("a.i32", [1, -2, 3], VT.INT32),
    ("a.u64", [2**64 - 1, 0], VT.UINT64),
    ("a.f32", [0.5, -2.25], VT.FLOAT32),
    ("a.f64", [1e300, -0.0], VT.FLOAT64),
    ("a.bool", [True, False, True], VT.BOOL),
    ("a.str", ["", "a", "日本語", "x" * 300], VT.STRING),
]


def write_with_gguf_writer(path: Path, *, alignment: int | None = None) -> dict[str, np.ndarray]:
    """A small model file with every value type and F32/F16/Q8_0 tensors; returns raw data."""
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((3, 8)).astype(np.float32)
    f16 = rng.standard_normal((2, 3, 5)).astype(np.float16)
    q8 = quantize(rng.standard_normal((4, 64)).astype(np.float32), QT.Q8_0)
    writer = GGUFWriter(path, "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, value, vtype in SCALARS:
        writer.add_key_value(key, value, vtype)
    for key, values, etype in ARRAYS:
        writer.add_key_value(key, values, VT.ARRAY, sub_type=etype)
    writer.add_tensor("f32", f32)
    writer.add_tensor("f16", f16)
    writer.add_tensor("q8", q8, raw_dtype=QT.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"f32": f32, "f16": f16, "q8": q8}


def test_metadata_round_trips_every_value_type(tmp_path: Path) -> None:
    write_with_gguf_writer(tmp_path / "m.gguf")
    with read_gguf(tmp_path / "m.gguf") as f:
        assert f.version == 3
        assert f.metadata["general.architecture"] == "llama"
        for key, value, vtype in SCALARS:
            assert f.metadata_types[key] == (vtype,)
            expected = np.float32(value).item() if vtype is VT.FLOAT32 else value
            assert f.metadata[key] == expected and type(f.metadata[key]) is type(value)
        for key, values, etype in ARRAYS:
            assert f.metadata_types[key] == (VT.ARRAY, etype)
            assert f.metadata[key] == values
            assert all(type(v) is type(values[0]) for v in f.metadata[key])


@pytest.mark.parametrize("alignment", [None, 64, 1])
def test_tensors_round_trip(tmp_path: Path, alignment: int | None) -> None:
    arrays = write_with_gguf_writer(tmp_path / "m.gguf", alignment=alignment)
    with read_gguf(tmp_path / "m.gguf") as f:
        assert f.alignment == (alignment or 32)
        assert f.data_offset % f.alignment == 0
        assert list(f.tensors) == ["f32", "f16", "q8"]
        assert f.tensors["f32"] == TensorInfo("f32", (8, 3), QT.F32, f.tensors["f32"].offset, 96)
        assert f.tensors["f16"].shape == (2, 3, 5) and f.tensors["f16"].dims == (5, 3, 2)
        assert f.tensors["f16"].n_elements == 30 and f.tensors["f16"].ggml_type is QT.F16
        q8 = f.tensors["q8"]
        assert (q8.ggml_type, q8.shape, q8.nbytes) == (QT.Q8_0, (4, 64), 4 * 2 * 34)
        for name, array in arrays.items():
            info = f.tensors[name]
            assert (info.offset - f.data_offset) % f.alignment == 0
            view = f.tensor_data(name)
            assert view.dtype == np.uint8 and view.shape == (info.nbytes,)
            assert not view.flags.writeable
            assert view.tobytes() == array.tobytes()


def test_views_outlive_close_and_closed_file_refuses(tmp_path: Path) -> None:
    arrays = write_with_gguf_writer(tmp_path / "m.gguf")
    f = read_gguf(tmp_path / "m.gguf")
    view = f.tensor_data("f32")
    f.close()
    f.close()  # idempotent
    assert view.tobytes() == arrays["f32"].tobytes()
    with pytest.raises(GGUFError, match="closed"):
        f.tensor_data("f32")
    with pytest.raises(GGUFError, match="no tensor named 'nope'"):
        read_gguf(tmp_path / "m.gguf").tensor_data("nope")


@pytest.mark.parametrize("chunk", [1 << 24, 7])  # one read per tensor; many, on threads
def test_read_tensor_into_copies_the_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    from rocmforge.gguf import reader

    monkeypatch.setattr(reader, "READ_CHUNK", chunk)
    arrays = write_with_gguf_writer(tmp_path / "m.gguf")
    with read_gguf(tmp_path / "m.gguf") as f:
        for name, array in arrays.items():
            out = np.full(f.tensors[name].nbytes, 0xAB, dtype=np.uint8)
            f.read_tensor_into(name, out)
            assert out.tobytes() == array.tobytes()
        with pytest.raises(ValueError, match="96 bytes"):
            f.read_tensor_into("f32", np.empty(95, dtype=np.uint8))
        with pytest.raises(GGUFError, match="no tensor named"):
            f.read_tensor_into("nope", np.empty(1, dtype=np.uint8))
    with pytest.raises(GGUFError, match="closed"):
        f.read_tensor_into("f32", np.empty(96, dtype=np.uint8))


def test_read_tensor_into_a_file_truncated_while_open(tmp_path: Path) -> None:
    write_with_gguf_writer(tmp_path / "m.gguf")
    with read_gguf(tmp_path / "m.gguf") as f:
        info = f.tensors["q8"]
        os.truncate(tmp_path / "m.gguf", info.offset + 10)
        with pytest.raises(GGUFFormatError, match="file ends inside tensor 'q8'"):
            f.read_tensor_into("q8", np.empty(info.nbytes, dtype=np.uint8))


def test_vocab_only_file_v2_and_empty_arrays(tmp_path: Path) -> None:
    empty = kv("e", VT.ARRAY, u32(VT.INT32) + u64(0))
    strings = kv("s", VT.ARRAY, u32(VT.STRING) + u64(0))
    data = header(0, 3, version=2) + ARCH_KV + empty + strings  # no trailing padding either
    f = read_gguf(write(tmp_path, data))
    assert isinstance(f, GGUFFile) and f.version == 2 and f.tensors == {}
    assert f.metadata == {"general.architecture": "llama", "e": [], "s": []}
    assert f.metadata_types["e"] == (VT.ARRAY, VT.INT32)


# --- malformed files ---------------------------------------------------------------------

BIG = 2**63
FMT, UNSUP = GGUFFormatError, GGUFUnsupportedError
KEY_K = KV0 + 9 + 4  # value of a first KV whose key is "k"
TI_W = KV0 + 9 + 4 + 8  # type of a first tensor "w" with one dim, when there are no KVs
W4 = tinfo("w", (4,))
ALIGN_TYPE = KV0 + 8 + len("general.alignment")
BIG_ENDIAN = b"GGUF" + struct.pack(">IQQ", 3, 0, 0)


def kv1(vtype: int, payload: bytes, pad: int = 0) -> bytes:
    """A file with one KV, key "k", and ``pad`` zero bytes after it."""
    return header(0, 1) + kv("k", vtype, payload) + bytes(pad)


def arr1(etype: int, count: int, body: bytes) -> bytes:
    """A file with one array KV, key "k"."""
    return kv1(VT.ARRAY, u32(etype) + u64(count) + body)


def align1(vtype: int, payload: bytes) -> bytes:
    return gguf_bytes([kv("general.alignment", vtype, payload)])


def t1(dims: tuple[int, ...], ggml_type: int = QT.F32, offset: int = 0, data: int = 16) -> bytes:
    """A file with one tensor "w" and ``data`` bytes of tensor data."""
    return gguf_bytes([], [tinfo("w", dims, ggml_type, offset)], bytes(data))


# (id, file bytes, exception type, field named in the message, its byte offset)
MALFORMED: list[tuple[str, bytes, type[GGUFError], str, int]] = [
    ("empty file", b"", FMT, "magic", 0),
    ("bad magic", b"GGML" + bytes(40), FMT, "magic", 0),
    ("truncated magic", b"GG", FMT, "magic", 0),
    ("version 1", gguf_bytes(version=1), UNSUP, "version", 4),
    ("version 4", gguf_bytes(version=4), UNSUP, "version", 4),
    ("big-endian", BIG_ENDIAN, UNSUP, "version", 4),
    ("truncated version", b"GGUF\x03\x00", FMT, "version", 4),
    ("truncated tensor_count", header(0, 0)[:12], FMT, "tensor_count", 8),
    ("huge tensor_count", header(BIG, 0), FMT, "tensor_count", 8),
    ("tensor_count 2**64-1", header(2**64 - 1, 0), FMT, "tensor_count", 8),
    ("huge kv_count", header(0, BIG) + ARCH_KV, FMT, "kv_count", 16),
    ("kv_count over file", header(0, 4) + ARCH_KV, FMT, "kv_count", 16),
    ("key past EOF", header(0, 1) + u64(BIG) + bytes(20), FMT, "metadata key #0", KV0),
    ("2nd key past EOF", header(0, 2) + ARCH_KV + u64(50) + bytes(6), FMT, "metadata key #1", 69),
    ("string past EOF", kv1(VT.STRING, u64(1000) + b"abc"), FMT, "metadata 'k'", KEY_K),
    ("truncated scalar", kv1(VT.UINT64, b"\1\2\3", pad=2), FMT, "metadata 'k'", KEY_K),
    ("array past EOF", arr1(VT.UINT32, 2**62, bytes(8)), FMT, "metadata 'k' length", KEY_K + 4),
    ("array 2**64-1", arr1(VT.UINT8, 2**64 - 1, bytes(8)), FMT, "metadata 'k' length", KEY_K + 4),
    ("string array count", arr1(VT.STRING, 2**61, bytes(64)), FMT, "'k' length", KEY_K + 4),
    (
        "string array element past EOF",
        arr1(VT.STRING, 2, gstr("a") + u64(BIG) + bytes(8)),
        FMT,
        "metadata 'k' [1]",
        KEY_K + 12 + 9,
    ),
    ("unknown value type", kv1(13, bytes(8)), FMT, "metadata 'k' type", KEY_K - 4),
    ("unknown element type", arr1(99, 1, bytes(8)), FMT, "metadata 'k' element type", KEY_K),
    ("nested array", arr1(VT.ARRAY, 1, u32(VT.UINT8) + u64(1) + b"\0"), UNSUP, "nested", KEY_K),
    ("UTF-8 key", header(0, 1) + kv(b"\xff\xfe", VT.UINT8, b"\0"), FMT, "metadata key #0", KV0),
    ("UTF-8 string", kv1(VT.STRING, gstr(b"a\xc3")), FMT, "metadata 'k'", KEY_K),
    (
        "UTF-8 in string array",
        arr1(VT.STRING, 2, gstr("ok") + gstr(b"\xed\xa0\x80")),
        FMT,
        "metadata 'k' [1]",
        KEY_K + 12 + 10,
    ),
    ("empty key", header(0, 1) + kv("", VT.UINT32, u32(1)) + bytes(4), FMT, "metadata key #0", KV0),
    ("duplicate key", gguf_bytes([ARCH_KV, ARCH_KV]), FMT, "metadata key #1", KV0 + len(ARCH_KV)),
    ("bool 2", kv1(VT.BOOL, b"\x02", pad=1), FMT, "metadata 'k'", KEY_K),
    ("bool array 7", arr1(VT.BOOL, 3, b"\1\0\7"), FMT, "metadata 'k' [2]", KEY_K + 14),
    ("alignment 48", align1(VT.UINT32, u32(48)), FMT, "general.alignment", ALIGN_TYPE + 4),
    ("alignment 0", align1(VT.UINT32, u32(0)), FMT, "general.alignment", ALIGN_TYPE + 4),
    ("alignment 2 MiB", align1(VT.UINT32, u32(1 << 21)), FMT, "general.alignment", ALIGN_TYPE + 4),
    ("alignment UINT64", align1(VT.UINT64, u64(32)), FMT, "general.alignment", ALIGN_TYPE),
    ("alignment string", align1(VT.STRING, gstr("32")), FMT, "general.alignment", ALIGN_TYPE),
    ("empty tensor name", gguf_bytes([], [tinfo("", (4,))], bytes(16)), FMT, "tensor #0 name", KV0),
    (
        "duplicate tensor",
        gguf_bytes([], [W4, tinfo("w", (4,), offset=32)], bytes(48)),
        FMT,
        "tensor #1 name",
        KV0 + len(W4),
    ),
    ("n_dims 5", t1((1, 1, 1, 1, 4)), FMT, "tensor 'w' n_dims", KV0 + 9),
    ("n_dims 0", t1(()), FMT, "tensor 'w' n_dims", KV0 + 9),
    ("n_dims 2**32-1", header(1, 0) + gstr("w") + u32(2**32 - 1) + bytes(64), FMT, "dims", KV0 + 9),
    ("truncated dims", header(1, 0) + gstr("w") + u32(4) + bytes(20), FMT, "'w' dims", KV0 + 13),
    ("zero dim", t1((4, 0)), FMT, "tensor 'w' dims", KV0 + 13),
    ("dims overflow int64", t1((2**32, 2**32)), FMT, "tensor 'w' dims", KV0 + 13),
    ("dim 2**64-1", t1((2**64 - 1,)), FMT, "tensor 'w' dims", KV0 + 13),
    ("unknown tensor type", t1((4,), 99), UNSUP, "tensor 'w' type", TI_W),
    ("removed type Q4_2", t1((32,), 4, data=32), UNSUP, "tensor 'w' type", TI_W),
    ("row not whole blocks", t1((33,), QT.Q8_0, data=64), FMT, "tensor 'w' dims", KV0 + 13),
    ("misaligned offset", t1((4,), offset=4, data=32), FMT, "tensor 'w' offset", TI_W + 4),
    (
        "overlapping tensors",
        gguf_bytes([], [tinfo("a", (16,)), tinfo("b", (4,), offset=32)], bytes(64)),
        FMT,
        "tensor 'b' offset",
        KV0 + 2 * len(W4) - 8,
    ),
    ("data past EOF", t1((4096,), data=100), FMT, "tensor 'w' offset", TI_W + 4),
    ("huge tensor", t1((2**31, 2**31)), FMT, "tensor 'w' offset", TI_W + 12),
    ("offset past EOF", t1((4,), offset=2**64 - 32), FMT, "tensor 'w' offset", TI_W + 4),
    (
        "truncated tensor info",
        gguf_bytes([], [tinfo("weight", (4,))], bytes(16))[: KV0 + 38 - 3],
        FMT,
        "tensor 'weight' offset",
        KV0 + 38 - 8,
    ),
]


@pytest.mark.parametrize(
    ("data", "exc_type", "field", "offset"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_malformed_file_is_rejected(
    tmp_path: Path, data: bytes, exc_type: type[GGUFError], field: str, offset: int
) -> None:
    path = write(tmp_path, data)
    start = time.perf_counter()
    with pytest.raises(exc_type) as info:
        read_gguf(path)
    assert time.perf_counter() - start < 0.5
    exc = info.value
    assert type(exc) is exc_type
    assert field in str(exc) and str(path) in str(exc)
    where = exc.offset if isinstance(exc, GGUFFormatError) else exc.details["offset"]
    assert where == offset


def test_big_endian_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(GGUFUnsupportedError, match="big-endian .*version 3"):
        read_gguf(write(tmp_path, BIG_ENDIAN))


def test_truncated_file_says_so(tmp_path: Path) -> None:
    data = gguf_bytes([ARCH_KV], [tinfo("w", (64,))], bytes(256))
    with pytest.raises(GGUFFormatError, match="truncated .*download"):
        read_gguf(write(tmp_path, data[:-1]))


def test_oserrors_become_gguf_errors(tmp_path: Path) -> None:
    for path, reason in [(tmp_path / "missing.gguf", "No such file"), (tmp_path, "directory")]:
        with pytest.raises(GGUFError, match=f"cannot open GGUF file .*{reason}") as info:
            read_gguf(path)
        assert type(info.value) is GGUFError and isinstance(info.value.__cause__, OSError)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads anything")
def test_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path, gguf_bytes([ARCH_KV]))
    path.chmod(0)
    with pytest.raises(GGUFError, match="Permission denied") as info:
        read_gguf(path)
    assert isinstance(info.value.__cause__, PermissionError)


# --- fuzzing: corruptions either parse or raise GGUFError --------------------------------

FUZZ_BASE = gguf_bytes(
    [
        ARCH_KV,
        kv("general.alignment", VT.UINT32, u32(32)),
        kv("k", VT.ARRAY, u32(VT.STRING) + u64(3) + gstr("a") + gstr("bc") + gstr("")),
        kv("n", VT.ARRAY, u32(VT.INT32) + u64(2) + u32(7) + u32(9)),
        kv("b", VT.BOOL, b"\1"),
    ],
    [tinfo("w", (8, 2)), tinfo("q", (32,), QT.Q8_0, offset=64)],
    bytes(64) + bytes(34),
)


@pytest.fixture(scope="module")
def fuzz_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "f.gguf"


def test_fuzz_base_is_valid(tmp_path: Path) -> None:
    f = read_gguf(write(tmp_path, FUZZ_BASE))
    assert f.metadata["k"] == ["a", "bc", ""] and f.metadata["n"] == [7, 9]
    summary = [(t.name, t.shape, t.nbytes) for t in f.tensors.values()]
    assert summary == [("w", (2, 8), 64), ("q", (32,), 34)]


@settings(max_examples=300, deadline=1000)
@given(
    flips=st.lists(st.tuples(st.integers(0, len(FUZZ_BASE) - 1), st.integers(0, 255)), max_size=6),
    cut=st.integers(0, len(FUZZ_BASE)),
)
def test_corrupted_files_parse_or_raise_gguf_error(
    fuzz_path: Path, flips: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(FUZZ_BASE)
    for position, value in flips:
        data[position] = value
    fuzz_path.write_bytes(bytes(data[:cut]))
    try:
        f = read_gguf(fuzz_path)
    except GGUFError:
        return
    with f:  # whatever parsed must be internally consistent
        for info in f.tensors.values():
            assert info.offset + info.nbytes <= cut
            assert len(f.tensor_data(info.name)) == info.nbytes


# --- the real default model against gguf-py's reader -------------------------------------


@pytest.fixture(scope="module")
def reference(default_gguf: Path) -> GGUFReader:
    return GGUFReader(default_gguf)


@pytest.mark.slow
def test_default_model_parses_fast(default_gguf: Path) -> None:
    start = time.perf_counter()
    with read_gguf(default_gguf) as f:
        elapsed = time.perf_counter() - start
        assert len(f.metadata["tokenizer.ggml.tokens"]) == 49152
        assert len(f.metadata["tokenizer.ggml.merges"]) == 48900
    assert elapsed < 1.0


@pytest.mark.slow
def test_default_model_matches_gguf_reader(default_gguf: Path, reference: GGUFReader) -> None:
    with read_gguf(default_gguf) as f:
        assert f.data_offset == reference.data_offset and f.alignment == reference.alignment
        fields = {k: v for k, v in reference.fields.items() if not k.startswith("GGUF.")}
        assert list(f.metadata) == list(fields)
        for key, field in fields.items():
            assert f.metadata_types[key] == tuple(field.types), key
            assert f.metadata[key] == field.contents(), key
        assert list(f.tensors) == [t.name for t in reference.tensors]
        for ref in reference.tensors:
            info = f.tensors[ref.name]
            assert info.dims == tuple(int(d) for d in ref.shape)
            assert (info.ggml_type, info.nbytes) == (ref.tensor_type, ref.n_bytes)
            assert info.offset == ref.data_offset
        for ref in (reference.tensors[0], reference.tensors[1], reference.tensors[-1]):
            assert f.tensor_data(ref.name).tobytes() == ref.data.tobytes()
