"""The HTTP server: native and OpenAI-compatible routes over the :class:`AsyncEngine`."""
