"""Publish events, answers and source status to an MQTT broker through a durable outbox.

Topics, under a configurable prefix (default ``stream_rt``), in the conventions Frigate
users know:

- ``<prefix>/available``: ``online`` (retained) on every (re)connect; ``offline``
  (retained) when the sink stops cleanly, before it disconnects; the broker publishes
  ``offline`` (the Last Will, retained) if the connection is lost;
- ``<prefix>/<source>/events``: one JSON object per event (``type`` new|update|end|ask|check,
  ``event_id``, media and wall times, ``score`` and ``components``, ``regions``), QoS 1;
- ``<prefix>/<source>/answers``: the model's answers (:class:`MllmAnswer`), keyed by the
  ``event_id`` of the event they answer, QoS 1;
- ``<prefix>/<source>/last_answer``: the last of them (``dropped`` aside: it answered
  nothing), retained, so a consumer that connects later finds it;
- ``<prefix>/<source>/snapshot``: the JPEG of the last event's frame, retained, with
  ``snapshots`` (while the broker is away only the newest waits in the outbox);
- ``<prefix>/<source>/transcript``: what was said, one JSON object per stretch of speech
  (:class:`~stream_rt.graph.packets.Transcript`: ``text``, ``words`` with media times),
  QoS 1, when the source is transcribed;
- ``<prefix>/<source>/status``: ``{"state": "online"|"offline", "detail": ...}``,
  retained, QoS 1; a source whose stream ends (end of file, the daemon stopping) is
  published ``offline`` then, so a dashboard never shows a stopped daemon's cameras up;
- ``<prefix>/<source>/available``: ``online`` | ``offline``, retained, as its status;
- ``<prefix>/<source>/activity``: ``ON`` when an episode opens, ``OFF`` when it ends,
  retained;
- ``<prefix>/<source>/enabled/state``: ``ON`` | ``OFF``, retained, on connect and after
  each ``enabled`` command;
- ``<prefix>/<source>/watch/<id>``: a standing watch's transitions (``state`` unmet, met,
  expired or removed, ``since_ns``, ``event_id``, ``summary``), retained, QoS 1;
- ``<prefix>/history/answers``: the one reply to each question of
  ``<prefix>/history/ask/set`` (:mod:`stream_rt.sinks.mqtt.history`): the model's answer
  from the history with the event ids it cited, or why the question was refused; QoS 1;
- ``<prefix>/stats``: the graph's counters (``Graph.statistics()``) every
  ``stats_interval_s``, QoS 0, not kept in the outbox (only the latest matters).

With ``home_assistant`` the sink also publishes Home Assistant's MQTT discovery messages
on every connect, and a standing watch's as it is set or removed
(:mod:`stream_rt.sinks.mqtt.home_assistant`).

Every retained state is current on the broker after each (re)connect, also after a
broker restart that forgot them all: published again after the backlog of older values.

Each message is committed to the :class:`~stream_rt.sinks.outbox.Outbox` first and
removed only once the broker has acknowledged it (PUBACK), so an unreachable broker, a
broker restart or a crash of this process loses nothing; the connection is retried with
backoff for as long as the sink runs, and starting while the broker is down is fine.
:meth:`MqttSink.health` reports a broker unreachable for longer than a grace time.

The rooms: :mod:`~stream_rt.sinks.mqtt.sink` (the graph node),
:mod:`~stream_rt.sinks.mqtt.connection` (connect, reconnect, what went wrong),
:mod:`~stream_rt.sinks.mqtt.delivery` (outbox to broker, retained states, in order),
:mod:`~stream_rt.sinks.mqtt.commands` (the command listener),
:mod:`~stream_rt.sinks.mqtt.home_assistant` (discovery), :mod:`~stream_rt.sinks.mqtt.messages`
(topics and payloads), :mod:`~stream_rt.sinks.mqtt.history` (questions about the past).
"""

from stream_rt.sinks.mqtt.sink import MqttSink

__all__ = ["MqttSink"]
