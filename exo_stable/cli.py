"""The ``exo-stable`` command line: serve, generate, fetch."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import signal
import sys
from contextlib import aclosing
from pathlib import Path
from typing import TYPE_CHECKING

from exo_stable import __version__, eventloop, settings

if TYPE_CHECKING:
    from exo_stable.node.node import NodeConfig

ENV_API_KEY = settings.API_KEY.name


def _model_path(arg: str | None) -> Path:
    if arg:
        return Path(arg).expanduser()
    from exo_stable.engine.store import ensure_default_model

    return ensure_default_model(progress=sys.stderr.isatty())


def _dtype(arg: str | None, device: str = "cpu") -> object:
    from exo_stable.engine.modelspec import Dtype
    from exo_stable.engine.platform import default_dtype

    return Dtype(arg) if arg else default_dtype(device)


def _device(args: argparse.Namespace) -> str:
    """Resolve --device (default: the best available) and make it this process's device."""
    from exo_stable.engine.device import choose, describe, resolve

    kind = resolve(args.device)
    choose(kind)
    logging.getLogger("exo_stable.engine.device").info("computing on %s", describe(kind))
    return kind.value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive whole number")
    return value


def _add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "gpu"], help="compute on this device (default: the best available)")
    p.add_argument(
        "--gpu",
        type=int,
        metavar="N",
        help="on a machine with several GPUs, use GPU N (sets CUDA_VISIBLE_DEVICES; nodes can share a host)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exo-stable", description=__doc__)
    parser.add_argument("--version", action="version", version=f"exo-stable {__version__}")
    parser.add_argument("--log-level", default=settings.LOG.get())
    log_formats = ["text", "json"]
    log_help = "log lines as text or as JSON objects with the request id (or set EXO_STABLE_LOG_FORMAT)"
    default_log_format = (settings.LOG_FORMAT.get() or "text").lower()
    parser.add_argument("--log-format", default=default_log_format, choices=log_formats, help=log_help)
    sub = parser.add_subparsers(dest="command", required=True)
    dtypes = ["quantized", "float32", "bfloat16", "float16"]

    serve = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=52415, help="port (0 picks a free one; default 52415)")
    serve.add_argument(
        "--model",
        help="a GGUF file, an MLX/Hugging Face model directory, or random:<shape>[@seed] "
        "(random weights of a published shape, e.g. random:llama-3-8b; default: SmolLM2-135M)",
    )
    serve.add_argument("--dtype", choices=dtypes, help="weights in memory (default: fastest for this platform)")
    serve.add_argument(
        "--api-key",
        default=settings.API_KEY.get() or None,
        help=f"require this key on /v1/* (or set {ENV_API_KEY})",
    )
    serve.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    serve.add_argument("--max-tokens-cap", type=int, default=4096, help="largest max_tokens a request may ask")
    serve.add_argument("--max-concurrent", type=int, default=8, help="requests generating at once")
    serve.add_argument(
        "--max-queue",
        type=_non_negative_int,
        default=32,
        help="requests that may wait for a slot; beyond them a request gets 429 with Retry-After (default 32)",
    )
    serve.add_argument(
        "--batch",
        choices=["off", "exact", "fast"],
        default="exact",
        help="decode steps of concurrent requests in one forward call: where rows are bit-exact (exact, the "
        "default), up to --batch-limit whatever the backend (fast), or never (off); see README 'Batching'",
    )
    serve.add_argument(
        "--batch-limit",
        type=_positive_int,
        default=16,
        help="most requests one decode step carries, on one device and on each stage (default 16)",
    )
    serve.add_argument("--node-id", help="this node's name in the cluster (default: HOSTNAME-PORT)")
    serve.add_argument(
        "--peers",
        default=settings.PEERS.get(),
        help="host:port,... of other nodes to join (for networks without multicast)",
    )
    serve.add_argument(
        "--advertise",
        metavar="HOST[:PORT]",
        default=settings.ADVERTISE.get() or None,
        help="the address other nodes should dial to reach this one (behind NAT or port forwarding); default: the"
        " bound address, or with --host 0.0.0.0 / :: the address peers reached this node on and its interfaces'",
    )
    serve.add_argument(
        "--discovery",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="find peers with zeroconf (_exo-stable._tcp.local.)",
    )
    serve.add_argument(
        "--cluster-secret", default=None, help="shared secret peers must prove (or set EXO_STABLE_CLUSTER_SECRET)"
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="on a non-loopback address, accept peers without a cluster secret (anyone on the network can join)",
    )
    serve.add_argument(
        "--memory-gb", type=float, help="memory this node offers for the model and its caches (default: available)"
    )
    serve.add_argument(
        "--max-context",
        type=int,
        help="longest request in tokens; placement reserves KV cache for --max-concurrent of them "
        "(default: the model's context)",
    )
    serve.add_argument("--split", help="force the layers per stage, e.g. 10,12,8 (one count per node)")
    serve.add_argument("--max-stages", type=int, help="use at most this many nodes as stages")
    serve.add_argument(
        "--event-loop",
        choices=eventloop.CHOICES,
        help=f"asyncio event loop (default: ${eventloop.ENV}, else auto: uvloop where installed)",
    )
    serve.add_argument("--log-format", default=argparse.SUPPRESS, choices=log_formats, help=log_help)
    serve.add_argument(
        "--trace-ring", type=int, default=128, help="keep the traces of this many recent requests (GET /v1/traces/ID)"
    )
    serve.add_argument(
        "--replay",
        choices=["exact", "fast"],
        default="exact",
        help="how recovery rebuilds a request's caches: exact (the same forward calls as the original run; "
        "the answer goes on bit-identical) or fast (one batched re-prefill); default exact",
    )
    serve.add_argument(
        "--validation",
        choices=["off", "light", "strict"],
        default="light",
        help="validation level of requests that do not ask for one (body field exo_validation): off, light "
        "(token and activation checksums, positions, UTF-8; default) or strict (adds end-to-end activation "
        "checksums, every delta's encoding, spot-check recomputation)",
    )
    serve.add_argument(
        "--spot-check-fraction",
        type=_fraction,
        default=0.05,
        help="strict: the share of steps each stage computes twice and compares bit for bit (default 0.05)",
    )
    serve.add_argument(
        "--stage-max-restarts",
        type=_non_negative_int,
        default=2,
        help="restarts of a crashing stage within --stage-restart-period before the node is marked suspect",
    )
    serve.add_argument("--stage-restart-period", type=_positive_float, default=30.0, metavar="SECONDS")
    serve.add_argument(
        "--peer-timeout",
        type=_positive_float,
        default=1.5,
        metavar="SECONDS",
        help="a peer silent this long (no data, no heartbeat) is taken as gone and planned around (default 1.5;"
        " a node frozen for less, e.g. a long GC pause or SIGSTOP, stays in its plan)",
    )
    serve.add_argument(
        "--join-timeout",
        type=_non_negative_float,
        default=60.0,
        metavar="SECONDS",
        help="with no --peers, how long a node whose memory cannot hold the model alone waits for a peer to"
        " join before it exits with what would fit (default 60; inf: wait for ever). A node with --peers, or"
        " one a peer has joined, keeps waiting for more nodes",
    )
    serve.add_argument(
        "--suspect-seconds",
        type=_positive_float,
        default=60.0,
        help="how long plans leave out a node marked suspect (default 60)",
    )
    serve.add_argument(
        "--no-decode-ahead",
        dest="decode_ahead",
        action="store_false",
        help="a node holding the whole model waits for each greedy token before queuing the next step",
    )
    serve.add_argument(
        "--no-build-ahead",
        dest="build_ahead",
        action="store_false",
        help="a stage builds each decode step's graph only when its input comes, not while other stages compute",
    )
    serve.add_argument(
        "--no-adaptive-validation",
        dest="adaptive_validation",
        action="store_false",
        help="keep every request at its level even when corruption or retransmits are seen",
    )
    _add_device_args(serve)

    gen = sub.add_parser("generate", help="generate a reply to PROMPT in the terminal")
    gen.add_argument("prompt")
    gen.add_argument("--model")
    gen.add_argument("--dtype", choices=dtypes)
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--system", help="a system message")
    gen.add_argument("--raw", action="store_true", help="complete PROMPT as plain text, without the chat template")
    _add_device_args(gen)

    sub.add_parser("fetch", help="download and verify the default model")

    verify = sub.add_parser(
        "verify",
        help="check that a split model answers token for token like one device",
        description="Run prompts through the single device and through a cluster (greedy and seeded) and compare."
        " Exit status: 0 when every run is identical, 1 otherwise, 2 for usage or setup errors.",
    )
    verify.add_argument("--model", help="the model (default: SmolLM2-135M); with --tiny, its tokenizer's source")
    verify.add_argument("--dtype", choices=dtypes)
    verify.add_argument("--nodes", help="URL,URL,... of a running cluster's nodes (compares text through the API)")
    verify.add_argument("--api-key", default=settings.API_KEY.get() or None, help="for --nodes")
    verify.add_argument("--stages", default="2,3", help="in-process clusters of these many nodes (default 2,3)")
    verify.add_argument("--all-splits", action="store_true", help="every split point (use a small model: --tiny 6)")
    verify.add_argument("--tiny", type=int, metavar="LAYERS", help="verify a random tiny llama of LAYERS layers")
    verify.add_argument("--max-tokens", type=int, default=24)
    verify.add_argument("--seed", type=int, default=7, help="seed of the seeded runs (and of --tiny's weights)")
    verify.add_argument("--prompts", help="a JSON file: a list of strings or of message lists")
    verify.add_argument("--stress", metavar="DURATION", help="then keep requests going this long (30s, 2m)")
    verify.add_argument("--concurrency", type=int, default=4, help="requests at once in --stress (default 4)")
    verify.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take")
    return parser


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    from exo_stable.engine.platform import maybe_reexec

    maybe_reexec(args_list)
    args = build_parser().parse_args(args_list)
    from exo_stable.logs import LogFormat, configure

    if args.log_format not in set(LogFormat):
        print(f"exo-stable: error: log format {args.log_format!r} is not text or json", file=sys.stderr)
        return 2
    configure(args.log_level, args.log_format)
    try:
        if args.command == "fetch":
            print(_model_path(None))
            return 0
        if args.command == "serve":
            return _serve(args)
        if args.command == "generate":
            return asyncio.run(_generate(args))
        if args.command == "verify":
            return _verify(args)
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError, RuntimeError) as exc:  # OSError covers a missing model and a port in use
        print(f"exo-stable: error: {exc}", file=sys.stderr)
        return 2
    return 1


def node_config(args: argparse.Namespace) -> NodeConfig:
    """The node configuration that ``serve``'s arguments describe."""
    from exo_stable.api.server import ApiConfig
    from exo_stable.cluster.discovery import parse_static_peers
    from exo_stable.cluster.security import cluster_auth
    from exo_stable.engine.batching import BatchMode
    from exo_stable.node.node import NodeConfig
    from exo_stable.pipeline.levels import ValidationLevel
    from exo_stable.pipeline.recovery import ReplayMode
    from exo_stable.wire.handshake import resolve_secret

    split = tuple(int(x) for x in args.split.split(",")) if args.split else None
    auth = cluster_auth(args.host, resolve_secret(args.cluster_secret), insecure=args.insecure)
    return NodeConfig(
        model=_model_path(args.model),
        dtype=_dtype(args.dtype, _device(args)),  # type: ignore[arg-type]
        host=args.host,
        port=args.port,
        api=ApiConfig(
            api_key=args.api_key or None,
            max_body_bytes=args.max_body_bytes,
            max_tokens_cap=args.max_tokens_cap,
            trace_ring=args.trace_ring,
        ),
        max_concurrent=args.max_concurrent,
        max_queue=args.max_queue,
        node_id=args.node_id,
        peers=tuple(parse_static_peers(args.peers)) if args.peers else (),
        advertise=_advertise(args.advertise),
        discovery=args.discovery,
        cluster_secret=auth.secret,
        cluster_auth=auth.source,
        cluster_secret_path=auth.path,
        memory_bytes=int(args.memory_gb * (1 << 30)) if args.memory_gb else None,
        max_context=args.max_context,
        dtype_auto=args.dtype is None,
        split=split,
        max_stages=args.max_stages,
        replay=ReplayMode(args.replay),
        validation=ValidationLevel(args.validation),
        spot_check_fraction=args.spot_check_fraction,
        adaptive_validation=args.adaptive_validation,
        decode_ahead=args.decode_ahead,
        build_ahead=args.build_ahead,
        batch=BatchMode(args.batch),
        batch_limit=args.batch_limit,
        stage_max_restarts=args.stage_max_restarts,
        stage_restart_period_s=args.stage_restart_period,
        suspect_ttl_s=args.suspect_seconds,
        peer_timeout_s=args.peer_timeout,
        join_timeout_s=args.join_timeout,
    )


def _advertise(text: str | None) -> tuple[str, int | None] | None:
    """``--advertise host[:port]`` (IPv6 as ``[v6]:port``); the port defaults to the bound one."""
    if not text:
        return None
    from exo_stable.cluster.addresses import parse_host_port

    try:
        host, port = parse_host_port(text, default_port=0)
    except ValueError as exc:
        raise ValueError(f"--advertise {exc}") from None
    return host, port or None


def _serve(args: argparse.Namespace) -> int:
    from exo_stable.node.node import serve

    config = node_config(args)
    # Until the node's event loop takes over SIGTERM (once the model is open), a SIGTERM ends the process
    # cleanly: nothing has started that needs stopping.
    signal.signal(signal.SIGTERM, _terminate_before_start)
    # `kill -USR1 <pid>` writes every thread's stack to stderr (where a node that seems stuck is).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    loop = eventloop.resolve(args.event_loop)
    logging.getLogger("exo_stable.node.node").info("event loop: %s", loop)
    eventloop.run(serve(config), loop)
    return 0


def _terminate_before_start(signum: int, frame: object) -> None:
    raise SystemExit(0)


async def _generate(args: argparse.Namespace) -> int:
    from exo_stable.engine.loader import open_model
    from exo_stable.engine.sampling import SamplingParams
    from exo_stable.engine.single import SingleDeviceEngine
    from exo_stable.pipeline.service import GenerationJob, GenerationResult, InferenceService
    from exo_stable.tokenizer import ChatMessage

    source = open_model(_model_path(args.model))
    engine = SingleDeviceEngine(source, dtype=_dtype(args.dtype, _device(args)))  # type: ignore[arg-type]
    try:
        await engine.start()
        if args.raw:
            prompt = source.tokenizer.encode(args.prompt)
        else:
            messages = ([ChatMessage("system", args.system)] if args.system else []) + [
                ChatMessage("user", args.prompt)
            ]
            prompt = source.tokenizer.encode_chat(messages)
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        service = InferenceService(engine, max_active=1)
        result = GenerationResult(prompt_tokens=len(prompt))
        await service.admit()
        try:
            async with aclosing(service.stream(GenerationJob(prompt, params, args.max_tokens))) as deltas:
                async for delta in deltas:
                    sys.stdout.write(result.add(delta).text)
                    sys.stdout.flush()
        finally:
            service.release()
        sys.stdout.write("\n")
        print(f"[{result.completion_tokens} tokens, finish_reason={result.finish_reason}]", file=sys.stderr)
    finally:
        engine.close()
    return 0


def _verify(args: argparse.Namespace) -> int:
    import contextlib
    import tempfile

    from exo_stable.verify.run import (
        DEFAULT_PROMPTS,
        VerifyOptions,
        VerifySetupError,
        all_splits,
        load_prompts,
        parse_duration,
        run_verify,
    )

    def fail(message: str) -> int:
        print(f"exo-stable verify: {message}", file=sys.stderr)
        return 2

    try:
        stages = tuple(int(x) for x in args.stages.split(",") if x.strip())
        stress = parse_duration(args.stress) if args.stress else None
        prompts = tuple(load_prompts(Path(args.prompts))) if args.prompts else DEFAULT_PROMPTS
    except (ValueError, OSError) as exc:
        return fail(str(exc))
    nodes = tuple(u.strip() for u in (args.nodes or "").split(",") if u.strip())
    if not stages or min(stages) < 1:
        return fail("--stages needs node counts >= 1, e.g. 2,3")
    if args.max_tokens < 1 or args.concurrency < 1 or (args.tiny is not None and args.tiny < 1):
        return fail("--max-tokens, --concurrency and --tiny must be >= 1")
    if nodes and (args.all_splits or args.tiny):
        return fail("--all-splits and --tiny need in-process clusters; a running cluster (--nodes) keeps its split")
    if not nodes and args.log_level.upper() == "INFO" and not settings.LOG.is_set():
        logging.getLogger().setLevel(logging.WARNING)  # the nodes' chatter would drown the table
    real_stdout = sys.stdout
    with tempfile.TemporaryDirectory(prefix="exo-verify-") as tmp:
        model = _model_path(args.model)
        if args.tiny:
            from exo_stable.engine.synthetic import tiny_gguf

            model = tiny_gguf(Path(tmp) / f"tiny-{args.tiny}.gguf", model, layers=args.tiny, seed=args.seed)
        if args.all_splits and not nodes:
            from exo_stable.engine.loader import open_model

            layers = open_model(model).spec.num_hidden_layers
            count = sum(len(all_splits(layers, n)) for n in stages if n <= layers)
            if count > 40:
                print(
                    f"exo-stable verify: --all-splits means {count} splits of {layers} layers; "
                    "a tiny random model (--tiny 6) checks every split point in seconds",
                    file=sys.stderr,
                )
        options = VerifyOptions(
            model=model,
            dtype=_dtype(args.dtype),  # type: ignore[arg-type]
            stages=stages,
            every_split=args.all_splits,
            nodes=nodes,
            api_key=args.api_key or None,
            max_tokens=args.max_tokens,
            seed=args.seed,
            prompts=prompts,
            stress=stress,
            concurrency=args.concurrency,
            request_timeout_s=args.timeout,
        )

        def note(line: str) -> None:
            print(f"exo-stable verify: {line}", file=sys.stderr, flush=True)

        try:
            # Nodes print their own status lines on stdout; the report alone goes there.
            with contextlib.redirect_stdout(sys.stderr):
                ok = asyncio.run(run_verify(options, real_stdout, note))
        except VerifySetupError as exc:
            return fail(str(exc))
        except ExceptionGroup as group:
            return fail(f"a node failed: {group.exceptions!r}")
    return 0 if ok else 1


def _fraction(text: str) -> float:
    """A number in [0, 1] (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not within [0, 1]")
    return value


if __name__ == "__main__":
    raise SystemExit(main())
