"""Model definitions (pure torch), their architecture registry and the GGUF weight loader."""
