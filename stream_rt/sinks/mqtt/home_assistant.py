"""Home Assistant MQTT discovery: each camera appears in Home Assistant on its own.

With ``[sinks.mqtt] home_assistant = true`` the MQTT sink publishes, retained, on every
(re)connect, one discovery message per entity under ``<discovery_prefix>`` (Home
Assistant's default ``homeassistant``), grouped as one device per source:

- ``binary_sensor``: the source's activity, ``ON`` while an episode is open
  (``<prefix>/<source>/activity``, retained);
- ``switch``: whether the source may open episodes, the ``enabled`` command
  (``<prefix>/<source>/enabled/set``) with its state (``<prefix>/<source>/enabled/state``,
  retained);
- ``sensor``: the model's last answer (its summary, or its status when there is none)
  from ``<prefix>/<source>/last_answer`` (retained: a Home Assistant that restarts finds
  it), the whole answer as attributes;
- ``image``: the last event's snapshot, the JPEG on ``<prefix>/<source>/snapshot``
  (retained), with ``snapshots`` on;
- ``text``: a question for the model about the camera, sent as the ``ask`` command
  (``<prefix>/<source>/ask/set``; Home Assistant publishes the text as it is typed, so the
  entity's ``command_template`` wraps it in the command's JSON), when a model answers;
- ``sensor``, one per standing watch: its state (``unmet``, ``met``, ``expired``) from
  ``<prefix>/<source>/watch/<id>``, the whole transition as attributes; announced when the
  watch is set (:func:`watch_discovery`), removed with it (an empty retained config).

Every entity is available while both the daemon (``<prefix>/available``) and its source
(``<prefix>/<source>/available``) are ``online``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

ORIGIN = {"name": "stream_rt", "support_url": "https://github.com/stream-rt/stream_rt"}
ASK_TEMPLATE = '{{ {"question": value} | tojson }}'
"""The text entity's ``command_template``: the typed text as the ``ask`` command's JSON
(Jinja's ``tojson`` escapes quotes, backslashes and line breaks)."""
ASK_MAX = 255
"""The longest text Home Assistant's text entity takes (the ``ask`` command takes more)."""
WATCH_STATES = ["unmet", "met", "expired", "removed"]


def object_id(text: str) -> str:
    """``text`` as Home Assistant's discovery topics allow: ``[a-zA-Z0-9_-]`` only."""
    return re.sub(r"[^a-zA-Z0-9_-]", "_", text)


def discovery_messages(
    prefix: str,
    sources: list[str],
    discovery_prefix: str = "homeassistant",
    *,
    snapshots: bool = True,
    asks: bool = True,
    watches: Mapping[str, str] | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """``(topic, payload)`` of every discovery message for ``sources``; ids come from the
    topic prefix and the source, so daemons with their own prefixes on one broker differ.
    ``snapshots``: the image entity; ``asks``: the text entity (a model answers);
    ``watches``: each source's standing watch id, a sensor each."""
    messages = []
    for source in sources:
        entities: list[tuple[str, str, dict[str, Any]]] = [
            ("binary_sensor", "activity", {
                "name": "Activity", "device_class": "motion", "state_topic": f"{prefix}/{source}/activity",
            }),
            ("switch", "enabled", {
                "name": "Enabled", "command_topic": f"{prefix}/{source}/enabled/set",
                "state_topic": f"{prefix}/{source}/enabled/state", "icon": "mdi:cctv",
            }),
            ("sensor", "answer", {
                "name": "Last answer", "state_topic": f"{prefix}/{source}/last_answer", "icon": "mdi:text-box-outline",
                "value_template": "{{ ((value_json.answer or {}).summary or value_json.status)[:255] }}",
                "json_attributes_topic": f"{prefix}/{source}/last_answer",
            }),
        ]  # fmt: skip
        if snapshots:
            entities.append(("image", "snapshot", {
                "name": "Snapshot", "image_topic": f"{prefix}/{source}/snapshot", "content_type": "image/jpeg",
            }))  # fmt: skip
        if asks:
            entities.append(("text", "ask", {
                "name": "Ask", "command_topic": f"{prefix}/{source}/ask/set", "command_template": ASK_TEMPLATE,
                "min": 1, "max": ASK_MAX, "mode": "text", "icon": "mdi:chat-question-outline",
            }))  # fmt: skip
        for component, key, fields in entities:
            messages.append(_entity(prefix, source, discovery_prefix, component, key, fields))
        if watches and source in watches:
            messages.append(watch_discovery(prefix, source, watches[source], discovery_prefix))
    return messages


def watch_discovery(
    prefix: str, source: str, watch_id: str, discovery_prefix: str = "homeassistant"
) -> tuple[str, dict[str, Any]]:
    """The discovery message of the sensor of ``source``'s standing watch ``watch_id``
    (publish an empty retained payload on its topic to remove the entity)."""
    return _entity(prefix, source, discovery_prefix, "sensor", f"watch_{object_id(watch_id)}", {
        "name": f"Watch {watch_id}", "state_topic": f"{prefix}/{source}/watch/{watch_id}", "icon": "mdi:eye-check",
        "device_class": "enum", "options": WATCH_STATES, "value_template": "{{ value_json.state }}",
        "json_attributes_topic": f"{prefix}/{source}/watch/{watch_id}",
    })  # fmt: skip


def _entity(
    prefix: str, source: str, discovery_prefix: str, component: str, key: str, fields: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    device_id = object_id(f"{prefix}_{source}")
    common: dict[str, Any] = {
        "availability": [{"topic": f"{prefix}/available"}, {"topic": f"{prefix}/{source}/available"}],
        "availability_mode": "all",
        "device": {"identifiers": [device_id], "name": source, "manufacturer": "stream_rt", "model": "camera"},
        "origin": ORIGIN,
    }
    payload = {**fields, **common, "unique_id": f"{device_id}_{key}"}
    return f"{discovery_prefix}/{component}/{device_id}/{key}/config", payload
