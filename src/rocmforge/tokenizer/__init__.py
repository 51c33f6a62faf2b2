"""Tokenizer: GGUF vocabulary (or an HF tokenizer.json) -> encode/decode, and chat templates.

``Tokenizer.from_gguf_metadata(metadata)`` builds an HF ``tokenizers`` backend from the
GGUF's ``tokenizer.ggml.*`` keys; ``Tokenizer.chat_template`` renders conversations.
"""

from rocmforge.tokenizer.chat import ChatTemplate
from rocmforge.tokenizer.tokenizer import Tokenizer

__all__ = ["ChatTemplate", "Tokenizer"]
