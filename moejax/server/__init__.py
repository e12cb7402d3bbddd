"""`moejax serve`: the OpenAI-compatible HTTP server over `LLM.llm_engine` (needs the `serve` extra)."""
