"""The backends that answer an MLLM request (:class:`~stream_rt.mllm.backend.Backend`):
:mod:`.transformers_backend` runs a local Hugging Face model as a list of steps (prepare,
encode, compress, prefill, decode; :mod:`.call` holds the value each step hands on),
:mod:`.openai_backend` asks an OpenAI-compatible server. Importing this package imports
no torch."""
