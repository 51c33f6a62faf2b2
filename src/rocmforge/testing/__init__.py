"""Testing aids that ship with the package because the real server is tested with them:
fault injection (``ROCMFORGE_FAULT_INJECT``). Never for production; nothing in the engine
imports this package (``LLM`` wraps the model runner when faults are asked for)."""
