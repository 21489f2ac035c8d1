"""The fixed-size streaming memory (torch is loaded only for text embeddings)."""

from stream_rt.memory.streaming import MemoryEntry, StreamingMemory

__all__ = ["MemoryEntry", "StreamingMemory"]
