"""The stream-rt command as a user runs it: real processes, real signals, real files."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .media import make_media

CLI = [sys.executable, "-m", "stream_rt.cli"]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_replay_of_the_real_sample_logs_its_episodes(samples: Path, tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    result = run_cli("replay", str(samples / "walkway_speech.mkv"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "795 frames" in result.stderr and "drops: none" in result.stderr and "wall time" in result.stderr
    assert "episodes: 1 new" in result.stderr
    rows = records(out)
    events = [r for r in rows if r["kind"] == "Event"]
    assert next(e["type"] for e in events) == "new" and events[-1]["type"] == "end"
    assert len({e["event_id"] for e in events}) == 1, "pedestrians walk through the whole clip: one episode"
    assert rows[-1] == {**rows[-1], "kind": "EndOfStream", "reason": "eof"}


def test_replay_with_the_smoke_model_answers_every_call(samples: Path, tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    result = run_cli("replay", str(samples / "still_motion.mkv"), "--model", "smoke", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "NOT meaningful" in result.stderr
    rows = records(out)
    calls = [(r["event_id"], r["seq"]) for r in rows if r["kind"] == "Event" and r["call_model"]]
    answers = [(r["event_id"], r["seq"]) for r in rows if r["kind"] == "MllmAnswer"]
    assert calls and sorted(answers) == sorted(calls), "a replay answers every call (flow = block)"
    assert f"answers: {len(answers)} ok" in result.stderr or "reused" in result.stderr


def test_a_model_that_is_not_here_gives_one_clear_line(samples: Path) -> None:
    result = run_cli("replay", str(samples / "still_motion.mkv"), "--model", "acme/vision-9b")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("stream-rt:")]
    assert len(errors) == 1 and "cannot load model 'acme/vision-9b'" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_a_model_that_cannot_be_used_is_one_line_before_anything_starts(samples: Path, tmp_path: Path) -> None:
    """validate, replay and run refuse such a model up front (exit 2, one line); before,
    a replay answered every event 'error' and exited 0."""
    from stream_rt.testing import tiny_model

    text_only = tmp_path / "bert"  # a model transformers loads, but not as a vision-language one
    text_only.mkdir()
    (text_only / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (text_only / "model.safetensors").write_bytes(b"")
    whole_omni = tmp_path / "omni"  # as published: thinker and speech talker
    whole_omni.mkdir()
    (whole_omni / "config.json").write_text(json.dumps({"model_type": "qwen2_5_omni"}))
    no_weights = tmp_path / "empty"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))
    generic = tiny_model("internvl")  # runs on the generic path: no adapter for token reuse
    damaged, untokenized = tmp_path / "damaged", tmp_path / "untokenized"
    shutil.copytree(generic, damaged)
    shutil.copytree(tiny_model("qwen3_vl"), untokenized)
    with (damaged / "model.safetensors").open("r+b") as weights:
        weights.truncate(weights.seek(0, 2) // 2)  # a download cut short
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (untokenized / name).unlink()
    cases = [  # (model, more [mllm] keys, the line, whether replay is tried too)
        (text_only, "", "does not load as an image-text-to-text", True),
        (no_weights, "", "holds no weights", True),
        (whole_omni, "", "stream_rt runs the thinker: save it once with Qwen2_5OmniForConditionalGeneration", False),
        (generic, "token_reuse = { enabled = true }", "[mllm.token_reuse] enabled = false", True),
        (damaged, "", "damaged weights in", False),
        (untokenized, "", "has no tokenizer files", False),
        (generic, 'device = "cuda:7"', "device 'cuda:7' is not available", False),
    ]
    runs: list[tuple[list[str], str]] = []
    for k, (model, extra, expected, replay) in enumerate(cases):
        config = tmp_path / f"config{k}.toml"
        config.write_text(f'[[sources]]\nid = "cam"\nurl = "{samples / "still_motion.mkv"}"\n'
                          f'[mllm]\nmodel = "{model}"\n{extra}\n')  # fmt: skip
        runs.append((["validate", str(config)], expected))
        if replay:
            runs.append((["replay", str(samples / "still_motion.mkv"), "--config", str(config)], expected))
    with ThreadPoolExecutor(2) as pool:  # two at a time: each is mostly an interpreter importing torch
        results = list(pool.map(lambda run: run_cli(*run[0]), runs))
    for (command, expected), result in zip(runs, results, strict=True):
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and expected in lines[0], (command, result.stderr)
    ok = tmp_path / "ok.toml"
    ok.write_text(f'[[sources]]\nid = "cam"\nurl = "{samples / "still_motion.mkv"}"\n[mllm]\nmodel = "{generic}"\n')
    result = run_cli("validate", str(ok))
    assert result.returncode == 0 and "(internvl, generic path)" in result.stdout, result.stderr


def test_random_bytes_give_one_clear_line(tmp_path: Path) -> None:
    junk = tmp_path / "camera.mp4"
    junk.write_bytes(np.random.default_rng(3).integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    result = run_cli("replay", str(junk))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("stream-rt:")]
    assert errors == [errors[0]] and f"cannot open '{junk}'" in errors[0]
    assert "Traceback" not in result.stderr


def test_missing_file_gives_one_clear_line(tmp_path: Path) -> None:
    result = run_cli("replay", str(tmp_path / "nope.avi"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"stream-rt: cannot open '{tmp_path / 'nope.avi'}': no such file"


def test_truncated_file_replays_what_is_there(tmp_path: Path) -> None:
    full = make_media(tmp_path / "full.ts", frames=100, container="mpegts")
    cut = tmp_path / "cut.ts"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    result = run_cli("replay", str(cut))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "frames" in result.stderr


def test_validate_names_the_bad_key_path(tmp_path: Path) -> None:
    config = tmp_path / "cam.toml"
    config.write_text('[[sources]]\nid = "gate"\nurl = "rtsp://192.0.2.1/s"\nstall_timout_s = 3\n')
    result = run_cli("validate", str(config))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"stream-rt: {config}: sources[0].stall_timout_s: unknown key (did you mean 'stall_timeout_s'?)"
    )
    config.write_text('[[sources]]\nid = "gate"\nurl = "rtsp://192.0.2.1/s"\nstall_timeout_s = 3\n')
    ok = run_cli("validate", str(config))
    assert ok.returncode == 0 and "OK (1 sources: gate)" in ok.stdout


def test_sigterm_during_replay_loses_no_emitted_packet(samples: Path, tmp_path: Path) -> None:
    out = tmp_path / "frames.jsonl"
    config = tmp_path / "frames.toml"
    config.write_text(
        f'[graph]\nvideo_channel = {{ policy = "block", capacity = 8 }}\n[sinks.jsonl]\npath = "{out}"\nvideo = true\n'
    )
    proc = subprocess.Popen(
        [*CLI, "replay", str(samples / "vtest.avi"), "--speed", "5", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while (not out.exists() or out.stat().st_size < 5_000) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    rows = records(out)
    frames = [r for r in rows if r["kind"] == "VideoFrame"]
    assert 10 < len(frames) < 795, "the replay was stopped part way"
    # Every frame the source emitted reached the log, in order, and the log ends cleanly.
    assert [r["seq"] for r in frames] == list(range(len(frames)))
    assert f"{len(frames)} frames" in stderr
    assert rows[-1]["kind"] == "EndOfStream" and rows[-1]["reason"] == "stopped"


def test_example_configs_validate() -> None:
    for config in sorted((Path(__file__).parent.parent / "examples").glob("*.toml")):
        result = run_cli("validate", str(config))
        assert result.returncode == 0, f"{config.name}: {result.stderr}"


def test_run_a_config_with_a_file_source(samples: Path, tmp_path: Path) -> None:
    out = tmp_path / "run.jsonl"
    config = tmp_path / "replay.toml"
    config.write_text(
        f'[[sources]]\nid = "walkway"\nurl = "{samples / "vtest.avi"}"\n'
        f'[graph]\nvideo_channel = {{ policy = "block", capacity = 8 }}\n'
        f'[sinks.jsonl]\npath = "{out}"\nvideo = true\n'
    )
    result = run_cli("run", str(config), "--speed", "max")
    assert result.returncode == 0, result.stderr
    kinds = [r["kind"] for r in records(out)]
    assert kinds.count("VideoFrame") == 795 and kinds[0] == "SourceStatus" and kinds[-1] == "EndOfStream"


def test_progress_bar_on_a_terminal(samples: Path) -> None:
    import os
    import pty

    main, replica = pty.openpty()
    proc = subprocess.Popen(
        [*CLI, "replay", str(samples / "vtest.avi"), "--speed", "20"],
        stdin=subprocess.DEVNULL,
        stdout=replica,
        stderr=replica,
    )
    os.close(replica)
    output = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the replica side closed: the process has exited
            break
        if not chunk:
            break
        output += chunk
    os.close(main)
    assert proc.wait(30) == 0
    text = output.decode(errors="replace")
    assert "| " in text and "/79.5 s" in text and "fps" in text, text[-500:]
    assert "795 frames" in text


def test_json_logs_name_their_source(samples: Path, tmp_path: Path) -> None:
    config = tmp_path / "json.toml"
    config.write_text(
        f'[[sources]]\nid = "walkway"\nurl = "{samples / "vtest.avi"}"\n[logging]\nformat = "json"\nlevel = "info"\n'
    )
    result = run_cli("run", str(config), "--speed", "max")
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in result.stderr.splitlines()]  # every line is one JSON object
    opened = [e for e in entries if "opened" in e["message"]]
    assert opened and opened[0]["source"] == "walkway" and opened[0]["level"] == "info"


def summary_block(stderr: str) -> list[str]:
    """The end-of-run summary: from its title line to the end."""
    lines = stderr.splitlines()
    return lines[next(i for i, line in enumerate(lines) if line.startswith("replayed ")) :]


def test_the_summary_speaks_of_the_model_only_when_there_is_one(samples: Path, tmp_path: Path) -> None:
    """Without a model the summary said `model calls: 5`; with one it said `model calls: N`
    on the episodes line beside `(M model calls)` on the answers line, two different counts
    under one name."""
    result = run_cli("replay", str(samples / "still_motion.mkv"), "--no-progress")
    assert result.returncode == 0, result.stderr
    block = summary_block(result.stderr)
    assert any(line.startswith("  episodes: 3 new") for line in block), block
    assert not [line for line in block if "model" in line], block
    clip = make_media(tmp_path / "short.mkv", frames=25, audio_rate=None)
    result = run_cli("replay", str(clip), "--no-progress", "--model", "smoke")
    assert result.returncode == 0, result.stderr
    block = summary_block(result.stderr)
    assert sum(line.count("model calls") for line in block) == 1, block
    assert any(line.startswith("  answers: ") and line.endswith(" model calls)") for line in block), block


def test_a_file_that_is_no_media_prints_only_its_error(tmp_path: Path) -> None:
    """Not its line followed by an all-zero summary of a run that never started."""
    junk = tmp_path / "camera.mp4"
    junk.write_bytes(np.random.default_rng(4).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    result = run_cli("replay", str(junk))
    assert result.returncode == 2
    assert result.stderr.strip() == f"stream-rt: cannot open '{junk}': Invalid data found when processing input"


def test_an_mp4_cut_short_says_so(ffmpeg: str, tmp_path: Path) -> None:
    """An MP4 whose index comes first (`+faststart`) and whose data was cut off ended `eof`
    after a few of its frames with nothing saying that the file was truncated."""
    full, cut = tmp_path / "full.mp4", tmp_path / "cut.mp4"
    subprocess.run([ffmpeg, "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=160x120:rate=25",
                    "-frames:v", "200", "-c:v", "mpeg4", "-movflags", "+faststart", str(full)], check=True)  # fmt: skip
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 4])
    result = run_cli("replay", str(cut), "--no-progress")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line and "cut short" in line]
    assert len(warnings) == 1 and "of its 8.0 s" in warnings[0], result.stderr
    source = next(line for line in summary_block(result.stderr) if line.startswith("  source cut"))
    assert "cut short: ended at" in source, source
    whole = run_cli("replay", str(full), "--no-progress")
    assert whole.returncode == 0 and "cut short" not in whole.stderr, whole.stderr


def test_validate_reports_a_file_source_that_is_not_there(samples: Path, tmp_path: Path) -> None:
    """validate said OK, then `run` exited 2."""
    config = tmp_path / "cams.toml"
    missing = tmp_path / "gone.mp4"
    config.write_text(f'[[sources]]\nid = "yard"\nurl = "{samples / "vtest.avi"}"\n'
                      f'[[sources]]\nid = "door"\nurl = "{missing}"\n')  # fmt: skip
    result = run_cli("validate", str(config))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == f"stream-rt: {config}: sources (door): cannot open '{missing}': no such file"
    run = run_cli("run", str(config))
    assert run.returncode == 2 and run.stderr.strip() == f"stream-rt: cannot open '{missing}': no such file"
