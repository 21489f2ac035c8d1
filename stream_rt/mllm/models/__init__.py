"""What stream_rt knows of the local models it runs: the families and their adapters
(:mod:`.families`, :mod:`.adapters`), their processors (:mod:`.processors`), and the one
layer loop every technique plugs into (:mod:`.layer_loop`)."""
