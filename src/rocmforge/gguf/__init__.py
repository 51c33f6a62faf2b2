"""GGUF files: the bounds-checked, memory-mapped reader and its value/tensor types."""

from gguf import GGMLQuantizationType, GGUFValueType

from rocmforge.gguf.reader import GGUFFile, TensorInfo, read_gguf

__all__ = ["GGMLQuantizationType", "GGUFFile", "GGUFValueType", "TensorInfo", "read_gguf"]
