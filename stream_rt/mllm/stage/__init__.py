"""The MLLM stage: the graph node (:class:`MllmStage`, :mod:`.node`) and the parts it
composes, one per concern:

- :mod:`.intake`: the question of each source and the request built from an event
  (:mod:`.requests`: keyframe, region crop, context line; :mod:`.clips`: the frames and
  audio before an event, and the events that overtook their frames);
- :mod:`.scheduling`: when calls run (fair flow, budget, ``block``) on the graph's clock;
- :mod:`.stuck`: whether the model answers (stuck in a call given up on, or failing);
- :mod:`.memory_keeping`: the streaming memory each call sees and leaves, and its snapshot;
- :mod:`.watch_ticker`: standing watches expired, told the answers, published;
- :mod:`.answers`: the answer records the stage writes itself, and repeats marked;
- :mod:`.graph_clock`: the graph's clock, through which every part reads time.
"""

from stream_rt.mllm.stage.node import MllmStage

__all__ = ["MllmStage"]
