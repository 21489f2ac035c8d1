"""The graph: nodes joined by bounded channels, checked when built, run on one event loop.

Lifecycle. ``run()`` starts nodes (sinks first), runs every source's ``run()`` and every
other node's packet loop, and returns when all of them have finished: sources end with an
:class:`EndOfStream` that travels down every edge; a node ends once each of its inputs has
delivered one. ``stop()`` (also on SIGINT/SIGTERM under ``serve()``) stops the sources and
lets in-flight packets drain for up to ``drain_timeout_s``; then the remaining
non-sink nodes are cancelled, and sinks get another ``drain_timeout_s`` to write what
reached them, so sinks stop last. A second signal stops at once. Stopping works from every
state: a source waiting to connect is simply cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections import Counter
from dataclasses import asdict
from typing import Any

from stream_rt.graph.channel import Channel, Policy
from stream_rt.graph.clock import Clock, RealtimeClock
from stream_rt.graph.node import Context, Node, NodeFailed, Source, Supervision, describe_error
from stream_rt.graph.packets import ControlPacket, EndOfStream, Flush

log = logging.getLogger("stream_rt.graph")


class GraphBuildError(ValueError):
    """The graph is wired wrongly (unknown node or port, incompatible types, missing input)."""


class _Runner:
    """Book-keeping of one node inside a running graph."""

    def __init__(self, node: Node, supervision: Supervision) -> None:
        self.node = node
        self.supervision = supervision
        self.inputs: list[tuple[str, Channel]] = []
        self.outputs: dict[str, list[Channel]] = {port: [] for port in node.outputs}
        self.ctx: Context | None = None
        self.task: asyncio.Task[None] | None = None
        self.stats: Counter[str] = Counter()
        self.eos_sent = False


class Graph:
    """A dataflow graph. Add nodes, connect ports, then ``await run()`` (or ``serve()``)."""

    def __init__(self, clock: Clock | None = None, drain_timeout_s: float = 5.0) -> None:
        self.clock = clock or RealtimeClock()
        self.drain_timeout_s = drain_timeout_s
        self._runners: dict[str, _Runner] = {}
        self._channels: list[Channel] = []
        self._stopping = asyncio.Event()
        self._failure: NodeFailed | None = None
        self._started = False

    # ----------------------------------------------------------------- building

    def __contains__(self, name: object) -> bool:
        """Whether a node of this name was added."""
        return name in self._runners

    def add(self, node: Node, supervision: Supervision | None = None) -> Node:
        if node.name in self._runners:
            raise GraphBuildError(f"a node named '{node.name}' is already in the graph")
        self._runners[node.name] = _Runner(node, supervision or Supervision())
        return node

    def connect(self, output: str, input: str, policy: Policy = "block", capacity: int = 8) -> Channel:
        """Join ``"node.port"`` output to ``"node.port"`` input through a new channel.

        Fails at once, naming both ends, if a node or port is unknown or if the output
        can emit a packet type the input does not accept.
        """
        src, src_port = self._endpoint(output, "outputs")
        dst, dst_port = self._endpoint(input, "inputs")
        emitted = src.node.outputs[src_port]
        accepted = dst.node.inputs[dst_port]
        wrong = [t for t in emitted if not issubclass(t, accepted)]
        if wrong:
            raise GraphBuildError(
                f"cannot connect '{output}' -> '{input}': '{output}' emits "
                f"{_type_names(emitted)} but '{input}' accepts {_type_names(accepted)}"
            )
        try:
            channel = Channel(f"{output}->{input}", policy, capacity)
        except ValueError as exc:
            raise GraphBuildError(f"cannot connect '{output}' -> '{input}': {exc}") from None
        src.outputs[src_port].append(channel)
        dst.inputs.append((dst_port, channel))
        self._channels.append(channel)
        return channel

    def check(self) -> None:
        """Raise :class:`GraphBuildError` if a non-source node has no connected input."""
        if not self._runners:
            raise GraphBuildError("the graph has no nodes")
        for runner in self._runners.values():
            if not isinstance(runner.node, Source) and not runner.inputs:
                ports = ", ".join(runner.node.inputs) or "none declared"
                raise GraphBuildError(f"node '{runner.node.name}' has no input connected (its input ports: {ports})")

    def _endpoint(self, spec: str, side: str) -> tuple[_Runner, str]:
        name, _, port = spec.partition(".")
        runner = self._runners.get(name)
        if runner is None:
            known = ", ".join(sorted(self._runners)) or "none"
            raise GraphBuildError(f"unknown node '{name}' in '{spec}' (nodes: {known})")
        ports: dict[str, Any] = getattr(runner.node, side)
        if port not in ports:
            kind = "output" if side == "outputs" else "input"
            known = ", ".join(ports) or "none"
            raise GraphBuildError(f"node '{name}' has no {kind} port '{port}' ({side}: {known})")
        return runner, port

    # ----------------------------------------------------------------- running

    def serve(self, handle_signals: bool = True) -> None:
        """Run the graph to completion under uvloop, stopping cleanly on SIGINT/SIGTERM."""
        import uvloop

        uvloop.run(self.run(handle_signals=handle_signals))

    async def run(self, handle_signals: bool = False) -> None:
        """Run until every node has finished. Raises :class:`NodeFailed` if supervision
        stopped the graph because of a node's error."""
        if self._started:
            raise RuntimeError("a graph runs once: build a new one to run again")
        self.check()
        self._started = True
        self._stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals_installed = handle_signals and threading.current_thread() is threading.main_thread()
        if signals_installed:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            order = self._start_order()
            for runner in order:
                node = runner.node
                runner.ctx = Context(node.name, self.clock, runner.outputs, node.outputs, self._stopping)
            await self._start_nodes(order)
            for runner in order:
                body = self._run_source(runner) if isinstance(runner.node, Source) else self._run_node(runner)
                runner.task = asyncio.create_task(body, name=f"stream_rt:{runner.node.name}")
            await self._wait_all()
        finally:
            if signals_installed:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
        if self._failure is not None:
            raise self._failure

    async def _start_nodes(self, order: list[_Runner]) -> None:
        """Start every node; if one fails, stop those already started and raise."""
        for i, runner in enumerate(order):
            assert runner.ctx is not None
            try:
                await runner.node.start(runner.ctx)
            except Exception as exc:
                log.error("node '%s' failed to start: %s", runner.node.name, describe_error(exc))
                for started in reversed(order[:i]):
                    assert started.ctx is not None
                    with contextlib.suppress(Exception):
                        await started.node.stop(started.ctx)
                raise NodeFailed(runner.node.name, exc) from exc

    def stop(self) -> None:
        """Ask the graph to stop: sources end now, in-flight packets drain (bounded)."""
        if not self._stopping.is_set():
            log.info("stopping: draining in-flight packets (up to %.1f s)", self.drain_timeout_s)
            self._stopping.set()

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stopping.is_set():
            log.warning("second %s: stopping now without draining", sig.name)
            for runner in self._runners.values():
                if runner.task is not None:
                    runner.task.cancel()
            return
        log.info("%s received", sig.name)
        self.stop()

    async def _wait_all(self) -> None:
        tasks = [r.task for r in self._runners.values() if r.task is not None]
        stop_wait: asyncio.Task[Any] = asyncio.create_task(self._stopping.wait())
        pending: set[asyncio.Task[Any]] = set(tasks)
        try:
            while pending and not stop_wait.done():
                _, pending = await asyncio.wait(pending | {stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                pending.discard(stop_wait)
        finally:
            stop_wait.cancel()
        if pending:
            # Stopping: sources end at once, the rest drain, sinks last.
            for runner in self._runners.values():
                if isinstance(runner.node, Source) and runner.task is not None:
                    runner.task.cancel()
            inner = [r.task for r in self._runners.values() if not r.node.is_sink and r.task]
            await _wait_then_cancel(inner, self.drain_timeout_s)
            sinks = [r.task for r in self._runners.values() if r.node.is_sink and r.task]
            await _wait_then_cancel(sinks, self.drain_timeout_s)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for runner, result in zip([r for r in self._runners.values() if r.task], results, strict=True):
            if isinstance(result, Exception) and self._failure is None:
                log.error("node '%s' crashed: %s", runner.node.name, describe_error(result))
                self._failure = NodeFailed(runner.node.name, result)

    def _start_order(self) -> list[_Runner]:
        """Sinks first, sources last, so every consumer is ready before packets flow."""
        runners = list(self._runners.values())
        return sorted(runners, key=lambda r: (not r.node.is_sink, isinstance(r.node, Source)))

    def _send_eos(self, runner: _Runner, packet: EndOfStream) -> None:
        if runner.eos_sent:
            return
        runner.eos_sent = True
        for channels in runner.outputs.values():
            for channel in channels:
                channel.put_nowait(packet)

    async def _run_source(self, runner: _Runner) -> None:
        node, ctx = runner.node, runner.ctx
        assert isinstance(node, Source) and ctx is not None
        reason = "eof"
        try:
            while True:
                try:
                    await node.run(ctx)
                    break
                except asyncio.CancelledError:
                    reason = "stopped"
                    raise
                except Exception as exc:
                    if not await self._supervise(runner, exc):
                        reason = "failed"
                        break
        finally:
            await self._finish(runner, reason)

    async def _run_node(self, runner: _Runner) -> None:
        node, ctx = runner.node, runner.ctx
        assert ctx is not None
        ready = asyncio.Event()
        open_inputs = list(runner.inputs)
        for _, channel in open_inputs:
            channel.on_ready.append(ready)
        last_eos: EndOfStream | None = None
        reason = "eof"
        try:
            while open_inputs:
                progressed = False
                for port, channel in list(open_inputs):
                    packet = channel.get_nowait()
                    if packet is None:
                        continue
                    progressed = True
                    ctx.port = port
                    try:
                        if isinstance(packet, EndOfStream):
                            last_eos = packet
                            open_inputs.remove((port, channel))
                            channel.close()
                            await node.on_control(packet, ctx)
                        elif isinstance(packet, ControlPacket):
                            await node.on_control(packet, ctx)
                            if isinstance(packet, Flush):
                                for channels in runner.outputs.values():
                                    for out in channels:
                                        out.put_nowait(packet)
                        else:
                            await node.process(packet, ctx)
                            runner.stats["processed"] += 1
                    except Exception as exc:
                        if not await self._supervise(runner, exc):
                            reason = "failed"
                            return
                if not progressed:
                    ready.clear()
                    await ready.wait()
        except asyncio.CancelledError:
            reason = "stopped"
            raise
        finally:
            for _, channel in runner.inputs:
                channel.close()
            await self._finish(runner, reason, last_eos)

    async def _supervise(self, runner: _Runner, exc: Exception) -> bool:
        """Handle a node's error; True to go on, False if the node must end."""
        node, ctx, policy = runner.node, runner.ctx, runner.supervision
        assert ctx is not None
        runner.stats["errors"] += 1
        restarts = runner.stats["restarts"]
        if policy.on_error == "restart" and (policy.max_restarts is None or restarts < policy.max_restarts):
            delay = policy.backoff(restarts + 1)
            log.error("node '%s' raised %s; restarting in %.1f s", node.name, describe_error(exc), delay)
            log.debug("node '%s' traceback", node.name, exc_info=exc)
            runner.stats["restarts"] += 1
            with contextlib.suppress(Exception):
                await node.stop(ctx)
            await self.clock.sleep(delay)
            try:
                await node.start(ctx)
                return True
            except Exception as start_exc:
                exc = start_exc
        if policy.on_error == "restart":
            log.error(
                "node '%s' raised %s after %d restarts; stopping the graph",
                node.name,
                describe_error(exc),
                restarts,
            )
        else:
            log.error("node '%s' raised %s; stopping the graph", node.name, describe_error(exc))
        log.debug("node '%s' traceback", node.name, exc_info=exc)
        if self._failure is None:
            self._failure = NodeFailed(node.name, exc)
        self.stop()
        return False

    async def _finish(self, runner: _Runner, reason: str, last: EndOfStream | None = None) -> None:
        node, ctx = runner.node, runner.ctx
        assert ctx is not None
        try:
            await node.stop(ctx)
        except Exception as exc:
            log.error("node '%s' failed to stop: %s", node.name, describe_error(exc))
        finally:
            if last is None or reason != "eof":
                last = EndOfStream(node.name, -1, -1, self.clock.wall_ns(), reason)
            self._send_eos(runner, last)

    # ----------------------------------------------------------------- statistics

    def statistics(self) -> dict[str, Any]:
        """Counters of every node and channel (processed, errors, restarts, drops by reason),
        each node's counters per source where it counts them so (``by_source``), and the
        gauges and histograms of the nodes that have any."""
        nodes, by_source = {}, {}
        for name, runner in self._runners.items():
            counters = dict(runner.stats)
            if runner.ctx is not None:
                counters.update(runner.ctx.counters)
                if runner.ctx.source_counters:
                    by_source[name] = {source: dict(c) for source, c in runner.ctx.source_counters.items()}
            nodes[name] = counters
        edges = {}
        for channel in self._channels:
            channel_stats = channel.statistics()
            edges[channel.name] = {**asdict(channel_stats), "dropped_total": channel_stats.dropped_total}
        now_ns = self.clock.now_ns()
        gauges = {name: levels for name, runner in self._runners.items() if (levels := runner.node.gauges(now_ns))}
        histograms = {
            name: {key: h.to_record() for key, h in named.items()}
            for name, runner in self._runners.items()
            if (named := runner.node.histograms())
        }
        return {"nodes": nodes, "by_source": by_source, "edges": edges, "gauges": gauges, "histograms": histograms}


async def _wait_then_cancel(tasks: list[asyncio.Task[None]], timeout: float) -> None:
    if tasks:
        await asyncio.wait(tasks, timeout=timeout)
    for task in tasks:
        task.cancel()


def _type_names(types: tuple[type, ...]) -> str:
    return " | ".join(t.__name__ for t in types)
