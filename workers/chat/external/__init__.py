"""Serving a chat model through an external OpenAI-compatible engine (Modular's `max serve`, vLLM, SGLang, another
Axion) instead of the native transformers engine: which backend (`choice`), the engine's process (`guard`,
`supervisor`), the HTTP client (`client`) and the stream worker that forwards jobs to it (`worker`)."""
