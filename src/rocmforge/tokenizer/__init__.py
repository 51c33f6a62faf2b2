"""Tokenizer: GGUF vocabulary (or an HF tokenizer.json) -> encode/decode, and chat prompts.

``Tokenizer.from_gguf_metadata(metadata)`` builds an HF ``tokenizers`` backend from the
GGUF's ``tokenizer.ggml.*`` keys; ``Tokenizer.encode_chat`` renders a conversation through
``Tokenizer.chat_template`` (sandboxed, under :class:`TemplateLimits`) into a
:class:`ChatPrompt` whose control tokens come only from the template.
"""

from rocmforge.tokenizer.chat import ChatTemplate
from rocmforge.tokenizer.chat_prompt import ChatPrompt
from rocmforge.tokenizer.template_limits import TemplateLimits
from rocmforge.tokenizer.tokenizer import Tokenizer

__all__ = ["ChatPrompt", "ChatTemplate", "TemplateLimits", "Tokenizer"]
