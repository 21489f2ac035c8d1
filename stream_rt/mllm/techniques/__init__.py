"""The efficiency techniques of the transformers backend, each plugged into the one layer
loop (:mod:`stream_rt.mllm.models.layer_loop`): temporal token and tile reuse
(:mod:`.token_reuse`, :mod:`.tile_reuse`), audio-guided clip compression
(:mod:`.compression`), the streaming memory's K/V prefix (:mod:`.memory_prefix`) and the
early layer exit while decoding (:mod:`.layer_exit`)."""
