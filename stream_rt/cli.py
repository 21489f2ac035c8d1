"""``stream-rt``: run a live daemon, replay a recording, check a config, or search its history.

Exit codes: 0 done, 1 the pipeline failed while running, 2 bad usage, config or input
(each reported as one line on stderr, without a traceback).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from stream_rt.config import (
    Config,
    ConfigError,
    JsonlSinkConfig,
    MllmConfig,
    OpsConfig,
    SourceConfig,
    for_replay,
    load_config,
)
from stream_rt.console import ProgressBar, summary
from stream_rt.graph import NodeFailed
from stream_rt.memory.history import History, is_history
from stream_rt.memory.when import parse_when
from stream_rt.mllm.backend import ModelUnavailable
from stream_rt.operators.detectors import DetectorUnavailable
from stream_rt.operators.recognizers import RecognizerUnavailable
from stream_rt.operators.vad import VadUnavailable
from stream_rt.ops.http import OpsServer
from stream_rt.ops.logging import setup_logging
from stream_rt.pipeline import Pipeline, build_backend, build_pipeline, history_embedder
from stream_rt.preflight import check_model, check_sources, validate
from stream_rt.sources.av_source import SourceError

if TYPE_CHECKING:
    from stream_rt.mllm.history_ask import HistoryAnswer

log = logging.getLogger("stream_rt.cli")

INPUT_ERROR = 2
"""The exit code of bad usage, config or input (reported in one line)."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            print(f"stream-rt: {line}", file=sys.stderr)
        return 2
    except VadUnavailable as exc:
        print(f"stream-rt: {exc} (or set [audio] vad = false)", file=sys.stderr)
        return 2
    except DetectorUnavailable as exc:
        print(f"stream-rt: {exc} (or set [detect] enabled = false)", file=sys.stderr)
        return 2
    except RecognizerUnavailable as exc:
        print(f"stream-rt: {exc} (or set [transcription] enabled = false)", file=sys.stderr)
        return 2
    except (ModelUnavailable, SourceError) as exc:
        print(f"stream-rt: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stream-rt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    replay = sub.add_parser("replay", help="replay a recorded file through the pipeline")
    replay.add_argument("file", type=Path)
    replay.add_argument(
        "--config",
        type=Path,
        help="pipeline config (TOML); channels it leaves unset stay lossless; its source of the file's name (or its "
        "only source) lends the file its own keys (zones, masks, question...)",
    )
    replay.add_argument(
        "--speed",
        type=_speed,
        default=None,
        metavar="X|max",
        help="pacing: 1 = real time, 2 = twice as fast, max = as fast as possible (default)",
    )
    replay.add_argument("--out", type=Path, help="append a JSON line per event to this file")
    replay.add_argument(
        "--report", type=Path, metavar="DIR", help="write an HTML report (timeline, episodes, answers) into DIR"
    )
    replay.add_argument(
        "--labels",
        type=Path,
        metavar="FILE",
        help="draw the labelled intervals of FILE on the report's timeline (JSON, as scripts/fetch_samples.py writes "
        'beside each sample: {"motion": [{"start_s": 20.0, "end_s": 26.0}]})',
    )
    replay.add_argument(
        "--model",
        help="ask this model about each episode: a model directory, a cached hub id, or 'smoke' (random weights, "
        "for trying the path; its answers are not meaningful)",
    )
    replay.add_argument(
        "--history",
        type=Path,
        metavar="FILE",
        help="keep the replay's events, answers and transcripts in this history (SQLite; 'stream-rt history' reads "
        "it); default: only when the config has a [history] section",
    )
    replay.add_argument("--no-progress", action="store_true", help="no progress bar")
    replay.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"])
    replay.set_defaults(handler=_replay)

    run = sub.add_parser("run", help="run the pipeline of a config (live daemon) until stopped")
    run.add_argument("config", type=Path)
    run.add_argument(
        "--speed",
        type=_speed,
        default=1.0,
        metavar="X|max",
        help="pacing of file sources in the config (default 1 = real time)",
    )
    run.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"])
    run.set_defaults(handler=_run)

    evaluate = sub.add_parser("eval", help="score the gates against labelled real recordings")
    evaluate.add_argument("scenarios", type=Path, nargs="+", help="scenario files (see scenarios/)")
    evaluate.add_argument(
        "--no-frigate",
        action="store_true",
        help="leave out the Frigate-style baseline (its detector at 5 fps is most of the evaluation's time)",
    )
    evaluate.set_defaults(handler=_eval)

    worker = sub.add_parser("worker", help="serve a local model over the OpenAI-compatible chat-completions API")
    worker.add_argument("--model", default="smoke", help="model directory, cached hub id, or 'smoke' (default)")
    worker.add_argument("--listen", default="127.0.0.1:8000", metavar="HOST:PORT", help="default 127.0.0.1:8000")
    worker.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    worker.add_argument("--max-new-tokens", type=int, default=128)
    worker.add_argument("--max-batch", type=_positive, default=None, metavar="N",
                        help="requests decoded together at most (continuous batching, for a family with an adapter; "
                             "other models decode one at a time; default 8)")  # fmt: skip
    worker.add_argument("--max-waiting", type=_positive, default=16, metavar="N",
                        help="requests that may wait for a place; more are answered 429 (default 16)")  # fmt: skip
    worker.add_argument(
        "--served-model-name",
        default=None,
        metavar="NAME",
        help="the model id clients ask for (default: 'smoke' for the smoke model, else --model)",
    )
    worker.add_argument("--api-key", default=None,
                        help="bearer token every /v1 request must carry (default $STREAM_RT_WORKER_API_KEY; "
                             "required to listen beyond loopback)")  # fmt: skip
    worker.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    worker.set_defaults(handler=_worker)

    _history_parser(sub)
    reference = sub.add_parser(
        "config-reference", help="print the configuration reference (Markdown) generated from the code"
    )
    reference.set_defaults(handler=_config_reference)
    validate = sub.add_parser("validate", help="check a config file and name every problem")
    validate.add_argument("config", type=Path)
    validate.add_argument(
        "--effective", action="store_true", help="print each source's resolved settings (defaults, then its own keys)"
    )
    validate.set_defaults(handler=_validate)
    return parser


def _history_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    history = sub.add_parser("history", help="search the history of events, answers and transcripts, or ask about it")
    kinds = history.add_subparsers(dest="history_command", required=True)
    search = kinds.add_parser(
        "search", allow_abbrev=False, help="the entries that best match a query (full-text and by meaning)"
    )
    search.add_argument("query")
    search.add_argument("--limit", type=_positive, default=10, metavar="N", help="entries shown at most (default 10)")
    search.add_argument("--mode", choices=["hybrid", "fts", "semantic"], default="hybrid",
                        help="hybrid (default): full-text and semantic fused by rank; fts: words only; semantic: "
                             "meaning only")  # fmt: skip
    search.set_defaults(handler=_history_search)
    ask = kinds.add_parser(
        "ask", allow_abbrev=False, help="the model answers from the entries that match the question, citing them"
    )
    ask.add_argument("question")
    ask.add_argument("--model", help="a model directory, a cached hub id, or 'smoke' (default: [mllm] of --config)")
    ask.add_argument("--entries", type=_positive, default=None, metavar="N",
                     help="entries the model answers from (default: [history] answer_entries, 12)")  # fmt: skip
    ask.set_defaults(handler=_history_ask)
    for command in (search, ask):
        command.add_argument("--source", help="only this source's entries")
        command.add_argument("--since", metavar="TIME", help="only entries since TIME: 2h, 30m, today, yesterday, "
                             "or an ISO time (2025-06-01T08:30)")  # fmt: skip
        command.add_argument("--until", metavar="TIME", help="only entries until TIME (the same forms)")
        command.add_argument("--config", type=Path, help="the daemon's config: its [history] path (and [mllm])")
        command.add_argument("--history", type=Path, metavar="FILE",
                             help="the history file (default: [history] path of --config, else "
                                  "stream_rt-history.sqlite)")  # fmt: skip
        command.add_argument("--json", action="store_true", help="print one JSON object")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a whole number >= 1, got {text!r}")
    return int(text)


def _speed(text: str) -> float | None:
    if text.lower() in ("max", "inf", "0"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"speed must be a number > 0 or 'max', got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"speed must be > 0 (or 'max'), got {text!r}")
    return value


def _worker(args: argparse.Namespace) -> int:
    import signal

    import uvloop

    from stream_rt.mllm.backends.transformers_backend import TransformersBackend
    from stream_rt.mllm.worker import RequestError, Worker

    setup_logging(args.log_level)
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        print(f"stream-rt: --listen takes HOST:PORT, got {args.listen!r}", file=sys.stderr)
        return 2
    backend = TransformersBackend(args.model, device=args.device, max_new_tokens=args.max_new_tokens)

    try:
        worker = Worker(backend, host, int(port), api_key=args.api_key or os.environ.get("STREAM_RT_WORKER_API_KEY"),
                        served_name=args.served_model_name, max_batch=args.max_batch,
                        max_waiting=args.max_waiting)  # fmt: skip
    except RequestError as exc:
        print(f"stream-rt: {exc}", file=sys.stderr)
        return 2

    async def serve() -> None:
        await worker.start()
        print(f"serving {worker.model_id} on http://{host}:{worker.port}/v1", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await worker.stop()
            log.info("worker stopped after %d requests", worker.served)

    try:
        uvloop.run(serve())
    except ModelUnavailable as exc:
        print(f"stream-rt: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"stream-rt: cannot listen on {args.listen}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


def _open_history(args: argparse.Namespace, semantic: bool) -> tuple[Config, History, tuple[int | None, int | None]]:
    """The config (``--config`` or the defaults), the history it names (or ``--history``)
    and the span of ``--since`` / ``--until``; bad arguments raise :class:`ConfigError`."""
    config = load_config(args.config) if args.config else Config()
    path = args.history or (history_path(config, args.config) if args.config else config.history.path)
    if not path.is_file():
        raise ConfigError(f"no history at '{path}': the daemon keeps it at [history] path; give --history FILE or "
                          "--config")  # fmt: skip
    if not is_history(path):
        raise ConfigError(f"'{path}' is not a stream_rt history (it has no entries table)")
    now = time.time_ns()
    span: list[int | None] = []
    for name in ("since", "until"):
        value = getattr(args, name)
        try:
            span.append(None if value is None else parse_when(value, now))
        except ValueError as exc:
            raise ConfigError(f"--{name}: {exc}") from None
    try:
        history = History(path, embedder=history_embedder(config.history) if semantic else None)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return config, history, (span[0], span[1])


def history_path(config: Config, config_file: Path) -> Path:
    """Where a daemon run with ``config_file`` keeps its history: ``[history] path``, by
    default beside the config file."""
    if "path" in config.history.model_fields_set:
        return config.history.path
    return config_file.parent / config.history.path


def _history_search(args: argparse.Namespace) -> int:
    import json

    setup_logging("warning")
    _, history, (since, until) = _open_history(args, semantic=args.mode != "fts")
    try:
        found = history.search(args.query, args.source, since, until, args.limit, args.mode)
    except RuntimeError as exc:  # semantic search without the embeddings installed
        print(f"stream-rt: {exc}", file=sys.stderr)
        return 2
    finally:
        history.close()
    if args.json:
        print(json.dumps({"query": args.query, "entries": [e.to_record() for e in found]}))
        return 0
    for e in found:
        text = e.text if len(e.text) <= 100 else e.text[:97] + "..."
        print(f"{e.time:%Y-%m-%d %H:%M:%S}  {e.source_id}  {e.kind:<10}  {e.event_id or '-'}  {e.score:.4f}  {text}")
    if not found:
        print("nothing found", file=sys.stderr)
    return 0


def _history_ask(args: argparse.Namespace) -> int:
    import json

    import uvloop

    from stream_rt.mllm.history_ask import ask_history

    setup_logging("warning")
    config, history, (since, until) = _open_history(args, semantic=True)
    mllm = config.mllm
    if args.model is not None:
        mllm = (mllm or MllmConfig()).model_copy(update={"model": args.model})
    if mllm is None:
        history.close()
        raise ConfigError("history ask needs a model: give --model (a model directory, a cached hub id or 'smoke') "
                          "or a --config with [mllm]")  # fmt: skip
    backend = build_backend(mllm)
    try:
        backend.check()  # one line before any search, for a model that cannot be used
    except ModelUnavailable:
        history.close()
        raise
    entries = args.entries or config.history.answer_entries

    async def answer() -> HistoryAnswer:
        try:
            return await ask_history(history, backend, args.question, source=args.source, since=since, until=until,
                                     entries=entries)  # fmt: skip
        finally:
            await backend.close()

    try:
        result = uvloop.run(answer())
    finally:
        history.close()
    if args.json:
        print(json.dumps(result.to_record()))
        return 0 if result.status != "error" else 1
    summary = (result.answer or {}).get("summary") or result.text.strip() or result.error or result.note
    print(summary)
    print(f"cited: {', '.join(result.cited) or 'none'}")
    if result.dropped:
        print(f"dropped (not among the entries given): {', '.join(result.dropped)}")
    print(f"sources: {', '.join(result.sources) or 'none'}")
    if result.note:
        print(f"note: {result.note}")
    if result.smoke:
        print("(smoke model with random weights: this answer is not meaningful)")
    return 0 if result.status != "error" else 1


def _config_reference(args: argparse.Namespace) -> int:
    from stream_rt.config_reference import config_reference

    sys.stdout.write(config_reference())
    return 0


def _validate(args: argparse.Namespace) -> int:
    print(validate(args.config, effective=args.effective))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    import uvloop

    from stream_rt.evaluation import evaluate, format_report

    setup_logging("warning")
    results = []
    for path in args.scenarios:
        result = uvloop.run(evaluate(path, frigate=not args.no_frigate))
        print(format_report(result))
        results.append(result)
    print(json.dumps(results))
    return 0


def _replay(args: argparse.Namespace) -> int:
    if not args.file.is_file():
        print(f"stream-rt: cannot open '{args.file}': no such file", file=sys.stderr)
        return 2
    labels = None
    if args.labels is not None:
        if args.report is None:
            raise ConfigError("--labels draws on the report: give --report DIR too")
        from stream_rt.evaluation import read_labels

        labels = read_labels(args.labels)
    base = load_config(args.config) if args.config else Config()
    source = SourceConfig(id=_source_id(args.file), url=str(args.file), live=False)
    own = [s for s in base.sources if s.id == source.id] or (base.sources if len(base.sources) == 1 else [])
    if own:  # the config's camera (its zones, masks, question, settings) watching this file, not its capture keys
        analysis = {k: getattr(own[0], k) for k in ANALYSIS_KEYS if k in own[0].model_fields_set}
        source = source.model_copy(update=analysis)
    sinks = base.sinks
    if args.out is not None:
        sinks = sinks.model_copy(update={"jsonl": JsonlSinkConfig(path=args.out)})
    mllm = base.mllm
    if args.model is not None:
        mllm = (mllm or MllmConfig()).model_copy(update={"model": args.model})
    # The camera's watch goes with it to the file's source; other cameras' watches are not replayed.
    watches = [w.model_copy(update={"source": source.id}) for w in base.watches if own and w.source == own[0].id]
    history = base.history
    if args.history is not None:  # what a replay keeps only when asked: a test run stays out of the daemon's history
        history = history.model_copy(update={"enabled": True, "path": args.history})
    elif history.enabled is None:
        history = history.model_copy(update={"enabled": "history" in base.model_fields_set})
    config = for_replay(base.model_copy(update={"sources": [source], "sinks": sinks, "mllm": mllm, "watches": watches,
                                                "history": history}))  # fmt: skip
    setup_logging(args.log_level or ("warning" if args.config is None else config.logging.level), config.logging.format)
    try:
        pipeline = build_pipeline(config, speed=args.speed)
    except ValueError as exc:
        raise ConfigError(f"{args.config or 'replay'}: {exc}") from None
    check_sources(pipeline)
    check_model(pipeline)
    if args.report is not None:
        thresholds = (config.trigger.on, config.trigger.off)
        pipeline.attach_report(args.report, f"Replay of {args.file.name}", thresholds, labels)
    started = time.monotonic()
    code = _execute(pipeline, progress=not args.no_progress)
    wall = time.monotonic() - started
    if code == INPUT_ERROR:  # said in its one line: a summary of nothing would bury it
        return code
    print(
        summary(f"replayed {args.file}", pipeline.graph.statistics(), pipeline.sources, wall),
        file=sys.stderr,
    )
    if pipeline.jsonl is not None:
        print(f"  output: {pipeline.jsonl.path} ({pipeline.jsonl.written} records)", file=sys.stderr)
    if config.history.enabled:
        print(f"  history: {config.history.path}", file=sys.stderr)
    if args.report is not None:
        print(f"  report: {args.report / 'index.html'}", file=sys.stderr)
    return code


def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    history = config.history.model_copy(update={"path": history_path(config, args.config)})
    if history.enabled is None:  # a daemon keeps its history unless told not to
        history = history.model_copy(update={"enabled": True})
    config = config.model_copy(update={"history": history})
    setup_logging(args.log_level or config.logging.level, config.logging.format)
    try:
        pipeline = build_pipeline(config, speed=args.speed)
    except ValueError as exc:
        raise ConfigError(f"{args.config}: {exc}") from None
    check_sources(pipeline)
    check_model(pipeline)
    log.info("running %d sources: %s", len(pipeline.sources), ", ".join(s.name for s in pipeline.sources))
    started = time.monotonic()
    code = _execute(pipeline, progress=False, ops=config.ops)
    wall = time.monotonic() - started
    if code != INPUT_ERROR:
        log.info("%s", summary("stopped", pipeline.graph.statistics(), pipeline.sources, wall))
    return code


def _execute(pipeline: Pipeline, progress: bool, ops: OpsConfig | None = None) -> int:
    """Run the graph under uvloop with signal handling; 0 on success, 1 if a node failed."""
    import uvloop

    async def go() -> None:
        bar = ProgressBar(pipeline.graph, pipeline.sources)
        drawing = asyncio.create_task(bar.run()) if progress else None
        server = None
        if ops is not None and ops.http:
            host, _, port = ops.http.rpartition(":")
            server = OpsServer(pipeline.graph.statistics, pipeline.sources, pipeline.graph.clock, host, int(port),
                               ops.offline_grace_s, pipeline.health_checks)  # fmt: skip
            await server.start()
        try:
            await pipeline.graph.run(handle_signals=True)
        finally:
            if server is not None:
                await server.stop()
            if drawing is not None:
                drawing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await drawing

    try:
        uvloop.run(go())
    except NodeFailed as exc:
        if isinstance(exc.error, SourceError | ModelUnavailable):
            print(f"stream-rt: {exc.error}", file=sys.stderr)
            return INPUT_ERROR
        print(f"stream-rt: {exc}", file=sys.stderr)
        return 1
    return 0


ANALYSIS_KEYS = ("change", "salience", "trigger", "detect", "question", "masks", "zones", "require_zones", "objects")
"""The keys of a configured camera that a replay of a file takes over (not how to capture it)."""


def _source_id(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", path.stem) or "file"


if __name__ == "__main__":
    sys.exit(main())
