"""Config files: unknown keys and bad values are named with their path; defaults are sane."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_rt import ConfigError, load_config, parse_config


def test_unknown_keys_are_named_with_their_path_and_a_hint() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(
            {
                "sources": [{"id": "a", "url": "x.mp4", "reconnect": {"inital_s": 1}}],
                "graph": {"video_chanel": {}},
                "sinkz": {},
            },
            origin="cam.toml",
        )
    lines = str(err.value).splitlines()
    assert "cam.toml: sources[0].reconnect.inital_s: unknown key (did you mean 'initial_s'?)" in lines
    assert "cam.toml: graph.video_chanel: unknown key (did you mean 'video_channel'?)" in lines
    assert "cam.toml: sinkz: unknown key (did you mean 'sinks'?)" in lines


def test_bad_values_and_missing_keys() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"sources": [{"id": "bad id", "url": "x"}, {"url": "y", "stall_timeout_s": -1}]})
    text = str(err.value)
    assert "sources[0].id: String should match pattern" in text
    assert "sources[1].id: required key is missing" in text
    assert "sources[1].stall_timeout_s: Input should be greater than 0" in text


def test_mqtt_sources_need_a_topic_and_raw_frames_a_size() -> None:
    ok = parse_config({"sources": [{"id": "r", "url": "mqtt://broker:1884/robot/cam/+", "frames": "jpeg"}]})
    assert ok.sources[0].mqtt_topic == "robot/cam/+"
    for source, error in [
        ({"url": "mqtt://broker:1883"}, "an MQTT source needs a topic"),
        ({"url": "mqtt://broker/cam", "frames": "gray", "width": 640}, "raw 'gray' frames need width and height"),
        ({"url": "cam.mp4", "width": 640}, "frames, width and height apply to mqtt:// sources only"),
    ]:
        with pytest.raises(ConfigError, match=error):
            parse_config({"sources": [{"id": "r", **source}]})


def test_duplicate_source_ids_are_rejected() -> None:
    with pytest.raises(ConfigError, match="source id 'a' is used twice"):
        parse_config({"sources": [{"id": "a", "url": "x"}, {"id": "a", "url": "y"}]})


def test_toml_syntax_errors_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[[sources]\nid = 1\n")
    with pytest.raises(ConfigError, match=r"bad.toml: not valid TOML: .*line 1"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"absent\.toml: cannot read: No such file"):
        load_config(tmp_path / "absent.toml")


def test_defaults_suit_a_live_daemon() -> None:
    config = parse_config({"sources": [{"id": "gate", "url": "rtsp://192.0.2.1/s"}]})
    assert config.graph.video_channel.policy == "latest"
    assert config.graph.audio_channel.policy == "drop_oldest"
    assert config.sources[0].stall_timeout_s == 10.0


def test_a_source_and_the_mqtt_sink_reconnect_on_the_same_default_backoff() -> None:
    """The config floor and the graph floor are siblings (neither imports the other), so
    the reconnect defaults are declared on each: a source's ``reconnect`` and the MQTT
    sink's built-in backoff must not drift apart."""
    from stream_rt.config import BackoffConfig
    from stream_rt.graph.backoff import Backoff

    assert Backoff(**BackoffConfig().model_dump()) == Backoff()


def test_memory_and_clip_settings_that_cannot_work_together_are_refused() -> None:
    source = [{"id": "cam", "url": "cam.mkv"}]
    for mllm, error in [
        ({"memory": {"enabled": True, "max_entries": 4, "anchors": 3}}, "anchors .3. must be below max_entries - 1"),
        ({"backend": "openai", "url": "http://127.0.0.1:1/v1", "memory": {"enabled": True}},
         "memory needs the 'transformers' backend"),
        ({"clip": {"frames": 4, "compression": "loud"}}, "mllm.clip.compression"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError, match=error):
            parse_config({"sources": source, "mllm": mllm})
    config = parse_config({"sources": source, "mllm": {"clip": {"frames": 8}, "memory": {"enabled": True}}})
    assert config.mllm is not None and config.mllm.clip.keep == 0.4 and config.mllm.memory.max_entries == 16


def test_the_config_reference_is_generated_and_covers_every_key() -> None:
    from stream_rt.config_reference import all_keys, config_reference

    generated = config_reference()
    committed = (Path(__file__).parents[1] / "docs" / "CONFIG.md").read_text()
    assert committed == generated, "docs/CONFIG.md is stale: run `stream-rt config-reference > docs/CONFIG.md`"
    sections = {s.split("\n", 1)[0]: s for s in generated.split("\n## ")[1:]}
    for key in all_keys():
        section, _, name = key.rpartition(".")
        heading = next(h for h in sections if h.startswith((f"`[{section}]`", f"`[[{section}]]`")) or
                       (not section and h.startswith("top level")))  # fmt: skip
        row = next((line for line in sections[heading].splitlines() if line.startswith(f"| `{name}` |")), None)
        assert row is not None and not row.endswith("|  |"), f"{key} is missing or undescribed"
    assert len(all_keys()) > 100 and {"mllm.memory.max_entries", "sinks.mqtt.tls_ca", "sources.url"} <= set(all_keys())


def test_questions_must_outwait_the_fusion() -> None:
    with pytest.raises(ConfigError, match=r"trigger.ask_wait_s \(0.5\) must exceed salience.max_lateness_s \(1\)"):
        parse_config({"trigger": {"ask_wait_s": 0.5}})


def test_camera_settings_that_cannot_work_are_refused_at_validation() -> None:
    cam = {"id": "cam", "url": "a.mp4"}
    for data, error in [
        ({"trigger": {"off": 0.6}}, r"^config: trigger.off \(0.6\) must be at most trigger.on \(0.5\)$"),
        ({"sources": [{**cam, "trigger": {"on": 0.2}}]}, r"sources\[0\] \(cam\): trigger.off \(0.3\) must be at most"),
        ({"trigger": {"off": 0.1}, "sources": [{**cam, "trigger": {"on": 0.2}}]}, None),  # merged: 0.1 <= 0.2
        ({"sources": [{**cam, "trigger": {"onn": 0.2}}]}, r"sources\[0\].trigger.onn: unknown key \(did you mean"),
        ({"sources": [{**cam, "require_zones": ["door"]}]}, "require_zones names 'door', which is not one of zones"),
        ({"sources": [{**cam, "objects": ["person"]}]}, "objects need the detector"),
        ({"sources": [{**cam, "objects": ["person"], "detect": {"enabled": True}, "change": {"enabled": False}}]},
         "the detector runs where change fired"),
        ({"sources": [{**cam, "zones": {"line": [[0, 0], [0.5, 0.5], [1, 1]]}}]}, "has no area"),
        ({"sources": [{**cam, "zones": {"bow": [[0, 0], [1, 1], [1, 0], [0, 1]]}}]}, None),  # crossed: has area
    ]:  # fmt: skip
        if error is None:
            parse_config(data)
            continue
        with pytest.raises(ConfigError, match=error):
            parse_config(data)


def test_per_camera_settings_take_effect_and_are_counted_per_source(tmp_path: Path) -> None:
    """Two synthetic cameras in one daemon: one with the defaults, one whose trigger never
    confirms and whose question is its own; each counts its own events in /metrics."""
    import asyncio

    from stream_rt import build_pipeline
    from stream_rt.config import LOSSLESS_CHANNELS
    from stream_rt.ops.http import OpsServer

    url = "synthetic:?frames=600&fps=25&width=64&height=48&active_s=1&period_s=2"
    data = {
        "sources": [{"id": "yard", "url": url},
                    {"id": "door", "url": url, "trigger": {"confirm_s": 60}, "question": "Who is at the door?"}],
        "graph": LOSSLESS_CHANNELS, "trigger": {"cutoff_s": 0.3},
    }  # fmt: skip
    asking = build_pipeline(parse_config({**data, "mllm": {"question": "What happens?"}}), speed=None)
    assert asking.mllm is not None  # built, not started: no model is loaded
    assert asking.mllm.question_for("door") == "Who is at the door?"
    assert asking.mllm.question_for("yard") == "What happens?"
    config = parse_config(data)
    assert config.settings("door").trigger.confirm_s == 60 and config.settings("door").trigger.cutoff_s == 0.3
    pipeline = build_pipeline(config, speed=None)
    graph = pipeline.graph
    asyncio.run(graph.run())
    by_source = graph.statistics()["by_source"]["trigger"]
    assert by_source["yard"]["events_new"] >= 5 and "events_new" not in by_source.get("door", {})
    metrics = OpsServer(graph.statistics, pipeline.sources, graph.clock).metrics()
    assert 'stream_rt_node_total{counter="events_new",node="trigger",source="yard"}' in metrics
    assert 'stream_rt_node_total{counter="events_new",node="trigger"}' not in metrics, "counted per source only"


def test_validate_effective_prints_each_sources_own_settings(tmp_path: Path) -> None:
    import subprocess
    import sys
    import tomllib

    path = tmp_path / "cams.toml"
    path.write_text(
        # Cameras: validate opens file sources (a missing file is an error), not live ones.
        '[trigger]\non = 0.6\n[[sources]]\nid = "gate"\nurl = "rtsp://192.0.2.1/a"\ntrigger = { on = 0.8 }\n'
        'zones.door = [[0, 0], [0.5, 0], [0.5, 1]]\nrequire_zones = ["door"]\n'
        '[[sources]]\nid = "yard"\nurl = "rtsp://192.0.2.1/b"\n'
    )
    out = subprocess.run([sys.executable, "-m", "stream_rt.cli", "validate", "--effective", str(path)],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    sections = out.split("\n[sources.")[1:]
    parsed = {s.split("]")[0]: tomllib.loads(s.split("\n", 1)[1]) for s in sections}
    assert parsed["gate"]["trigger"]["on"] == 0.8 and parsed["yard"]["trigger"]["on"] == 0.6
    assert parsed["gate"]["require_zones"] == ["door"] and parsed["yard"]["zones"] == {}


def _models_of(model: type[object]) -> list[type[object]]:
    """``model`` and every model its fields hold, each once."""
    import typing

    from pydantic import BaseModel

    found: list[type[object]] = []
    todo = [model]
    while todo:
        current = todo.pop()
        if current in found:
            continue
        found.append(current)
        assert isinstance(current, type) and issubclass(current, BaseModel)
        for field in current.model_fields.values():
            args = [field.annotation]
            while args:
                arg = args.pop()
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    todo.append(arg)
                args.extend(typing.get_args(arg))
    return found


def test_every_config_field_has_a_title_and_a_description() -> None:
    from pydantic import BaseModel

    from stream_rt.config import Config, SourceSettings

    models = _models_of(Config) + _models_of(SourceSettings)
    assert len(set(models)) >= 20
    untitled = [
        f"{model.__name__}.{name}"
        for model in models
        if issubclass(model, BaseModel)
        for name, field in model.model_fields.items()
        if not field.title or not field.description
    ]
    assert not untitled, f"fields without a title or a description: {untitled}"


def test_the_config_package_imports_nothing_else_of_stream_rt() -> None:
    import ast

    package = Path(__file__).parents[1] / "stream_rt" / "config"
    imported = {
        (path.name, name)
        for path in package.glob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        for name in (
            [a.name for a in node.names] if isinstance(node, ast.Import)
            else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        )
    }  # fmt: skip
    outside = sorted((file, name) for file, name in imported
                     if name.startswith("stream_rt") and not name.startswith("stream_rt.config"))  # fmt: skip
    assert len(imported) > 20 and not outside, f"config/ imports {outside}"


def test_a_sources_effective_settings_are_resolved_in_one_place() -> None:
    from stream_rt.config import effective_settings

    config = parse_config({
        "trigger": {"cutoff_s": 0.3}, "salience": {"weights": {"onset": 0.2}},
        "mllm": {"question": "What happens?"},
        "sources": [{"id": "door", "url": "a.mp4", "trigger": {"confirm_s": 60},
                     "salience": {"weights": {"speech": 0.5}}, "audio": {"onset_sigma": 5}}],
    })  # fmt: skip
    door = effective_settings(config, "door")
    assert door == config.settings("door")
    assert door.trigger.confirm_s == 60 and door.trigger.cutoff_s == 0.3 and door.audio.onset_sigma == 5
    assert door.salience.weights == {"onset": 0.2, "speech": 0.5} and door.question == "What happens?"
    pushed = effective_settings(config, "pushed")  # not in the config: the top-level sections
    assert pushed == effective_settings(config) and pushed.trigger == config.trigger and pushed.question is None
