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
  from ``<prefix>/<source>/answers``, the whole answer as attributes.

Every entity is available while both the daemon (``<prefix>/available``) and its source
(``<prefix>/<source>/available``) are ``online``.
"""

from __future__ import annotations

import re
from typing import Any

ORIGIN = {"name": "stream_rt", "support_url": "https://github.com/stream-rt/stream_rt"}


def object_id(text: str) -> str:
    """``text`` as Home Assistant's discovery topics allow: ``[a-zA-Z0-9_-]`` only."""
    return re.sub(r"[^a-zA-Z0-9_-]", "_", text)


def discovery_messages(prefix: str, sources: list[str], discovery_prefix: str = "homeassistant"
                       ) -> list[tuple[str, dict[str, Any]]]:  # fmt: skip
    """``(topic, payload)`` of every discovery message for ``sources``; ids come from the
    topic prefix and the source, so daemons with their own prefixes on one broker differ."""
    messages = []
    for source in sources:
        device_id = object_id(f"{prefix}_{source}")
        common: dict[str, Any] = {
            "availability": [{"topic": f"{prefix}/available"}, {"topic": f"{prefix}/{source}/available"}],
            "availability_mode": "all",
            "device": {"identifiers": [device_id], "name": source, "manufacturer": "stream_rt", "model": "camera"},
            "origin": ORIGIN,
        }
        entities: list[tuple[str, str, dict[str, Any]]] = [
            ("binary_sensor", "activity", {
                "name": "Activity", "device_class": "motion", "state_topic": f"{prefix}/{source}/activity",
            }),
            ("switch", "enabled", {
                "name": "Enabled", "command_topic": f"{prefix}/{source}/enabled/set",
                "state_topic": f"{prefix}/{source}/enabled/state", "icon": "mdi:cctv",
            }),
            ("sensor", "answer", {
                "name": "Last answer", "state_topic": f"{prefix}/{source}/answers", "icon": "mdi:text-box-outline",
                "value_template": "{{ ((value_json.answer or {}).summary or value_json.status)[:255] }}",
                "json_attributes_topic": f"{prefix}/{source}/answers",
            }),
        ]  # fmt: skip
        for component, key, fields in entities:
            payload = {**fields, **common, "unique_id": f"{device_id}_{key}"}
            messages.append((f"{discovery_prefix}/{component}/{device_id}/{key}/config", payload))
    return messages
