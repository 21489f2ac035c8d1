"""Media helpers every floor uses, depending on nothing of stream_rt's own: pictures in
:mod:`stream_rt.media.images` (luma, decode, resize, crop, JPEG snapshots)."""
