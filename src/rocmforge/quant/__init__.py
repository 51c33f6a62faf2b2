"""Matmuls on weights that stay quantized in memory (fewer bytes read per token)."""
