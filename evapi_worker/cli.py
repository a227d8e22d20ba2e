"""The ``evapi-worker`` command."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path

import trio

from . import __version__
from .bundled import copy_kamailio_files, kamailio_files
from .config import Config, ConfigError, config_from, parse_hostport, parse_node, read_toml, with_nodes
from .core.engine import Anchor, Strategy
from .core.sip_values import bracketed
from .lab.demo import DEMO_DOMAIN, DemoOptions, check_demo_addresses, run_demo
from .lab.kamailio_process import DemoError
from .lab.push_standin import rehearse
from .logs import kv, setup_logging
from .push_check import check_push
from .replay import apply_what_if, decision_json, decision_text, differences, load_records, progress_stream, replay
from .report import Figures, render_html
from .runtime import check_runtime, tune_gc
from .service import Service

__all__ = [
    "build_config",
    "build_parser",
    "main",
]

log = logging.getLogger("evapi_worker")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evapi-worker",
        description="Give push-woken (iOS CallKit) devices that register late the call they missed.",
    )
    parser.add_argument("--version", action="version", version=f"evapi-worker {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="connect to Kamailio and handle late registrations",
        description="Connect to each Kamailio node's evapi socket, keep the calls and push devices it "
        "reports, and give every device that registers too late for its call the call it missed "
        "(a fake INVITE and CANCEL through SIPp, or a SIP MESSAGE). Runs until SIGINT or SIGTERM.",
        epilog="Nodes come from --kamailio or from the [[kamailio]] tables of --config (--kamailio "
        "replaces them); at least one is needed. A node's NAME must be the EVW_NODE its Kamailio "
        "is started with: its events carry that name. Every option may also be set in the "
        "settings file (docs/configuration.md); an option given here wins.",
    )
    run.add_argument(
        "--kamailio",
        action="append",
        metavar="[NAME=]HOST:PORT[,sip=HOST:PORT]",
        help="a Kamailio node's evapi socket, and its SIP address for fake calls "
        "(default SIP: same host, port 5060; default NAME: HOST:PORT); repeat for several nodes",
    )
    run.add_argument(
        "--redis",
        metavar="URL",
        help="read the nodes' events from their Redis streams at URL (redis://host:port/db), for Kamailio "
        "started with EVW_REDIS; commands still go over evapi (default: events over evapi)",
    )
    add_run_options(run)
    demo = sub.add_parser(
        "demo", help="start Kamailio, the worker and SIPp phones on loopback and show a late iPhone get its call"
    )
    demo.add_argument("--sip", default="127.0.0.1:5060", metavar="HOST:PORT", help="Kamailio's SIP address (UDP+TCP)")
    demo.add_argument(
        "--tls",
        nargs="?",
        const="127.0.0.1:5061",
        metavar="HOST:PORT",
        help="listen on TLS too (default 127.0.0.1:5061), with a throw-away self-signed certificate",
    )
    demo.add_argument(
        "--sip6", metavar="ADDRESS", help="an IPv6 address to listen on too, on the same ports (e.g. ::1)"
    )
    demo.add_argument("--domain", default=DEMO_DOMAIN, help=f"the SIP domain served (default {DEMO_DOMAIN})")
    demo.add_argument("--auth", action="store_true", help="digest authentication; the demo's accounts are printed")
    demo.add_argument("--evapi", default="127.0.0.1:8448", metavar="HOST:PORT", help="Kamailio's evapi socket")
    demo.add_argument("--no-scenario", action="store_true", help="skip the scripted story; just run")
    demo.add_argument(
        "--push",
        action="store_true",
        help="the worker sends VoIP pushes through a local APNs stand-in; two more stories show iPhones it wakes",
    )
    demo.add_argument(
        "--redis",
        action="store_true",
        dest="local_redis",
        help="events through a local redis-server's stream (started and stopped with the demo; needs "
        "redis-server and kamailio-redis-modules), claims shared there",
    )
    add_run_options(demo)
    files = sub.add_parser(
        "kamailio-files",
        help="show where the installed Kamailio drop-ins, config and SIPp scenario are, or copy them",
        description="Print the paths of the files to add to your Kamailio config (evapi-worker-defs.cfg, "
        "evapi-worker-routes.cfg, and debian-stock.patch, the edits for Debian's stock kamailio.cfg), "
        "the complete kamailio.cfg and the SIPp scenario the worker runs; with DIR, copy them there "
        "(the complete config as evapi-worker-kamailio.cfg: your kamailio.cfg is never touched).",
    )
    files.add_argument("dir", nargs="?", type=Path, metavar="DIR", help="copy the files into DIR (made if missing)")
    files.add_argument("--force", action="store_true", help="replace files in DIR that differ")
    push = sub.add_parser(
        "push",
        help="check the push keys against Apple and Google, or rehearse with local stand-ins",
        description="check: one real request to each configured provider with the settings file's keys, and what "
        "the answer means (exit 1 when it fails). standin: serve local APNs and FCM stand-ins and print the "
        "settings that point a worker at them, then every push received.",
    )
    push_sub = push.add_subparsers(dest="push_command", metavar="ACTION", required=True)
    check = push_sub.add_parser(
        "check",
        help="send one request to Apple (and one validate_only message to Google) and explain the answer",
        description="Without --apns-token the APNs check pushes to a device token no phone has: Apple checks the "
        "key, key id and team, then refuses the token (BadDeviceToken: the credentials work). With a phone's "
        "VoIP token it checks the topic and the environment too, and that phone is woken (its app shows a "
        "call that ends by itself). FCM's check is validate_only: nothing is delivered.",
    )
    check.add_argument("--config", type=Path, metavar="FILE", required=True, help="the worker's TOML settings file")
    check.add_argument(
        "--topic", metavar="BUNDLE.voip", help="the app's VoIP topic (APNs; e.g. org.linphone.phone.voip)"
    )
    check.add_argument("--apns-token", metavar="HEX", help="a phone's VoIP token (pn-prid without :voip)")
    check.add_argument(
        "--sandbox", action="store_true", help="Apple's sandbox (a development build: pn-provider=apns.dev)"
    )
    check.add_argument("--fcm-token", metavar="TOKEN", help="an Android phone's FCM registration token")
    standin = push_sub.add_parser(
        "standin",
        help="serve APNs and FCM stand-ins locally and print the settings to use them",
        description="Real HTTP/2 servers over TLS that check what Apple and Google check, with a throw-away CA, "
        "APNs key and FCM service account made in --dir. Prints the [push.apns] and [push.fcm] settings "
        "for the worker, then a line per push received. Runs until Ctrl-C.",
    )
    standin.add_argument("--dir", type=Path, required=True, metavar="DIR", help="where the CA and keys are made")
    standin.add_argument("--apns", default="127.0.0.1", metavar="HOST[:PORT]", help="APNs stand-in (no port: any)")
    standin.add_argument("--fcm", default="127.0.0.1", metavar="HOST[:PORT]", help="FCM stand-in (no port: any)")
    rep = sub.add_parser(
        "replay",
        help="feed captured events through the engine under virtual time and show every decision",
        description="Replay capture files (run --capture) or JSON-lines event files. Nothing is sent anywhere.",
    )
    rep.add_argument("files", nargs="+", type=Path, metavar="FILE")
    rep.add_argument("--config", type=Path, metavar="FILE", help="TOML settings file for the engine settings")
    rep.add_argument("--window", type=float, metavar="SECONDS")
    rep.add_argument("--anchor", choices=[a.value for a in Anchor])
    rep.add_argument("--ua", action="append", metavar="REGEX", help="User-Agent pattern of push devices (repeatable)")
    rep.add_argument(
        "--json", action="store_true", help="one JSON object a line: the decisions, then the summary and the figures"
    )
    rep.add_argument(
        "--report",
        type=Path,
        metavar="FILE",
        help="write an HTML report (wake-up delays, what each window would serve, late devices over time)",
    )
    rep.add_argument(
        "--what-if",
        action="append",
        metavar="KEY=VALUE",
        help="also replay with this change (window, anchor, settle, deadline, ring_timeout, strategy, ua) "
        "and show the decisions that differ; repeatable",
    )
    return parser


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that runs the worker."""
    p.add_argument("--config", type=Path, metavar="FILE", help="TOML settings file (flags override it)")
    p.add_argument("--window", type=float, metavar="SECONDS", help="how late a REGISTER may be (default 15)")
    p.add_argument(
        "--anchor",
        choices=[a.value for a in Anchor],
        help="measure the window from the call's start or its end (default start)",
    )
    p.add_argument(
        "--strategy", choices=[s.value for s in Strategy], help="fake_call (SIPp; the default) or message (SIP MESSAGE)"
    )
    p.add_argument(
        "--ua",
        action="append",
        metavar="REGEX",
        help="User-Agent pattern of push devices (repeatable; default LinphoneiOS)",
    )
    p.add_argument("--sipp", metavar="PATH", help="SIPp binary (default: sipp on PATH)")
    p.add_argument("--scenario", type=Path, metavar="FILE", help="SIPp scenario (default: the bundled late_call.xml)")
    p.add_argument("--max-sipp", type=int, metavar="N", help="fake calls at once (default 1000)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default info")
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="where /metrics and /healthz listen (default 127.0.0.1:9848; off: nowhere)",
    )
    p.add_argument(
        "--capture",
        type=Path,
        metavar="DIR",
        help="record every frame received into rotating files in DIR (default: off)",
    )
    p.add_argument(
        "--state",
        type=Path,
        metavar="FILE",
        help="keep call and device state in FILE while running (snapshots and journals), restore it at start "
        "(default: in memory only)",
    )


# Flags and the settings-file keys they set; the file's rules check both.
_FLAGS = {
    "window": "engine.window",
    "anchor": "engine.anchor",
    "strategy": "engine.strategy",
    "ua": "engine.user_agents",
    "sipp": "sipp.binary",
    "scenario": "sipp.scenario",
    "max_sipp": "sipp.max_concurrent",
    "log_level": "log_level",
    "metrics": "metrics",
    "capture": "capture.folder",
    "state": "state_file",
    "redis": "redis.url",
}


def build_config(args: argparse.Namespace) -> Config:
    """The TOML file's settings with the command line's on top."""
    data = read_toml(args.config) if args.config is not None else {}
    names: dict[str, str] = {}
    for attr, key in _FLAGS.items():
        value = getattr(args, attr, None)
        if value is None:
            continue
        table, _, name = key.rpartition(".")
        target = data
        if table:
            section = data.get(table)
            # A flag's table replaces a file's value of the wrong kind; the
            # file's own errors are reported when it is read without flags.
            target = data[table] = dict(section) if isinstance(section, dict) else {}
        target[name] = str(value) if isinstance(value, Path) else value
        names[key] = "--" + attr.replace("_", "-")
    config = config_from(data, names)
    if getattr(args, "kamailio", None):
        config = with_nodes(config, tuple(parse_node(spec) for spec in args.kamailio))
    return config


def _replay(args: argparse.Namespace) -> int:
    settings = build_config(args).engine
    what_if = apply_what_if(settings, args.what_if) if args.what_if else None
    problems: list[str] = []
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        raise ConfigError("FILE", f"not a file: {', '.join(missing)}")
    tune_gc()
    # One pass, records read, decided and summarised as they come (the
    # what-if and the report's widest window by engines beside); the
    # decisions are printed as they are made (kept only for --what-if).
    out = sys.stdout
    show = (lambda d: print(decision_json(d), file=out)) if args.json else (lambda d: print(decision_text(d), file=out))
    sink = Figures(settings) if args.json or args.report is not None else None
    base = replay(
        load_records(args.files, problems), settings, progress_stream(), keep=what_if is not None,
        on_decision=show, figures=sink, what_if=what_if,
    )  # fmt: skip
    other = base.what_if
    for problem in problems:
        print(f"evapi-worker replay: {problem}", file=sys.stderr)
    figs = sink.result(base) if sink is not None else None
    if args.report is not None:
        assert figs is not None
        title = "evapi-worker replay: " + ", ".join(f.name for f in args.files)
        try:
            args.report.write_text(render_html(figs, title), encoding="utf-8")
        except OSError as exc:
            raise ConfigError("--report", f"cannot write {str(args.report)!r}: {exc.strerror or exc}") from None
        print(f"evapi-worker replay: report written to {args.report}", file=sys.stderr)
    if args.json:
        summary: dict[str, object] = {"summary": base.summary(), "figures": figs}
        if other is not None:
            summary["what_if"] = {
                "changes": args.what_if,
                "summary": other.summary(),
                "differences": [
                    {"call_id": c, "device": dev, "base": a, "what_if": b} for c, dev, a, b in differences(base, other)
                ],
            }
        print(json.dumps(summary, ensure_ascii=False), file=out)
        return 0
    print("\nsummary: " + json.dumps(base.summary(), indent=2), file=out)
    if other is not None:
        diffs = differences(base, other)
        print(f"\nwhat if {' '.join(args.what_if)}: {len(diffs)} decisions differ", file=out)
        for call_id, device, a, b in diffs:
            print(f"  call={call_id} device={device}: {a} -> {b}", file=out)
        print("summary: " + json.dumps(other.summary(), indent=2), file=out)
    return 0


async def _until_signal(
    main: Callable[[], Awaitable[object]], on_signal: Callable[[], Awaitable[object]] | None = None
) -> None:
    """Run ``main`` until SIGINT or SIGTERM; then ``on_signal`` (a graceful
    stop), then cancel ``main`` (any children left are killed)."""
    async with trio.open_nursery() as nursery:

        async def run_main() -> None:
            await main()
            nursery.cancel_scope.cancel()

        nursery.start_soon(run_main)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("signal %s", kv(signal=signal.Signals(signum).name))
                if on_signal is not None:
                    with trio.move_on_after(60):  # a second signal is not awaited: bound it
                        await on_signal()
                nursery.cancel_scope.cancel()
                break


def _run(args: argparse.Namespace) -> int:
    config = build_config(args)
    check_runtime(config)
    if not config.nodes:
        raise ConfigError(
            "--kamailio", "no Kamailio node to serve: give --kamailio NAME=HOST:PORT or [[kamailio]] tables in --config"
        )
    setup_logging(config.log_level)
    nodes = " ".join(
        f"{n.name}=evapi:{bracketed(n.evapi_host)}:{n.evapi_port},sip:{bracketed(n.sip_host)}:{n.sip_port}"
        for n in config.nodes
    )
    e = config.engine
    log.info(
        "starting %s",
        kv(
            version=__version__,
            nodes=nodes,
            window=e.window,
            anchor=e.anchor.value,
            strategy=e.strategy.value,
            metrics=f"http://{config.metrics[0]}:{config.metrics[1]}/metrics" if config.metrics else "off",
        ),
    )
    tune_gc()
    service = Service(config)
    trio.run(_until_signal, service.run, service.stop)
    return 0


def _push_check(args: argparse.Namespace) -> int:
    config = config_from(read_toml(args.config))
    results = trio.run(
        partial(
            check_push, config.push, apns_token=args.apns_token, topic=args.topic, sandbox=args.sandbox,
            fcm_token=args.fcm_token,
        )
    )  # fmt: skip
    for result in results:
        print(result.text())
    return 0 if all(r.ok for r in results) else 1


def _push_standin(args: argparse.Namespace) -> int:
    apns = parse_hostport(args.apns, "--apns", 0)
    fcm = parse_hostport(args.fcm, "--fcm", 0)
    try:
        trio.run(_until_signal, partial(rehearse, args.dir, apns, fcm, sys.stdout))
    except* OSError as group:
        exc = group.exceptions[0]
        assert isinstance(exc, OSError)
        raise ConfigError("--apns/--fcm/--dir", exc.strerror or str(exc)) from None
    return 0


def _kamailio_files(args: argparse.Namespace) -> int:
    if args.dir is None:
        for path in kamailio_files():
            print(path)
        return 0
    try:
        copied = copy_kamailio_files(args.dir, force=args.force)
    except FileExistsError as exc:
        raise ConfigError("DIR", f"these differ from the installed ones, kept (--force replaces them): {exc}") from None
    except OSError as exc:
        raise ConfigError("DIR", f"cannot copy into {str(args.dir)!r}: {exc.strerror or exc}") from None
    for path in copied:
        print(path)
    return 0


def _demo(args: argparse.Namespace) -> int:
    options = DemoOptions(
        sip=parse_hostport(args.sip, "--sip"),
        evapi=parse_hostport(args.evapi, "--evapi"),
        tls=parse_hostport(args.tls, "--tls") if args.tls else None,
        sip6=parse_hostport(f"[{args.sip6.strip('[]')}]", "--sip6", 0)[0] if args.sip6 else None,
        domain=args.domain,
        auth=args.auth,
        play=not args.no_scenario,
        push=args.push,
        redis=args.local_redis,
    )
    check_demo_addresses(options)
    config = build_config(args)
    setup_logging(config.log_level if args.log_level else "warning")
    tune_gc()
    failed = ""
    try:
        trio.run(_until_signal, partial(run_demo, config, options, sys.stdout))
    except* DemoError as group:
        failed = str(group.exceptions[0])
    if failed:
        print(f"evapi-worker demo: {failed}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "replay":
            return _replay(args)
        if args.command == "kamailio-files":
            return _kamailio_files(args)
        if args.command == "push":
            return _push_check(args) if args.push_command == "check" else _push_standin(args)
        return _demo(args) if args.command == "demo" else _run(args)
    except ConfigError as exc:
        print(f"evapi-worker: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
