"""The `kiosk` command line (SPEC section 2). Exit status: 0 success, 1 runtime failure,
2 bad usage or bad config."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import json
import logging
import os
import re
import select
import signal
import sys
import threading
import tomllib
import warnings
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from kiosk import __version__
from kiosk.errors import ConfigError, JournalError, KioskError
from kiosk.log import event, logging_in_background, setup_logging, under_systemd

if TYPE_CHECKING:
    from kiosk.scanner_hold import HeldScanner

log = logging.getLogger("kiosk")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
LOCK_FILE = "kiosk.lock"


class StateDirInUse(KioskError):
    """Another `kiosk run` holds the state directory's lock."""


class UsageError(KioskError, ValueError):
    """The command line itself is wrong (exit 2)."""


class KioskArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors as one `kiosk: ...` line through `main`'s boundary."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _config_path(args: argparse.Namespace) -> Path:
    from kiosk.config import default_config_path

    return (Path(args.config) if args.config else default_config_path()).absolute()


def build_parser(run_only: bool = False) -> argparse.ArgumentParser:
    """The command line's parser; `run_only`: with the `run` command alone, for `kiosk run`
    (every start of the service), which then builds and loads no other command's options."""
    parser = KioskArgumentParser(
        prog="kiosk", description="Alipay barcode payment firmware for vending kiosks."
    )
    parser.add_argument(
        "--version", action="version", version=f"kiosk {__version__}", help="print the version"
    )
    common = KioskArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $KIOSK_CONFIG, else /etc/kiosk/kiosk.toml)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", parents=[common], help="the daemon, in the foreground")
    run.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text (with timestamps in a terminal) or one JSON object per line",
    )
    if run_only:
        return parser

    # The demo builds its own config: no --config, so none is silently ignored.
    demo = sub.add_parser(
        "demo", help="play the scenarios with fake devices and a gateway simulator"
    )
    demo.add_argument(
        "--interactive",
        action="store_true",
        help="type payment codes yourself instead of the script",
    )
    demo.add_argument(
        "--log-format",
        choices=("text", "json", "none"),
        default="none",
        help="show the daemon's log lines too (default: only the summary)",
    )
    demo.add_argument(
        "--keep",
        action="store_true",
        help="keep the demo's journal and print where it is (default: deleted at exit)",
    )

    check = sub.add_parser("check", parents=[common], help="validate the config file")
    check.add_argument(
        "--format",
        choices=("text", "json"),
        default="text",
        help="json: one object with every problem, on stdout, for fleet tooling",
    )
    init = sub.add_parser("init", help="write the annotated example config")
    init.add_argument(
        "path", nargs="?", default="kiosk.toml", metavar="PATH", help="where to write it"
    )

    journal = sub.add_parser(
        "journal",
        parents=[common],
        help="list transactions and pending retries; retry or resolve one in attention",
        description="Without an ACTION: list transactions and pending retries, newest first "
        "(unfinished ones and the last 20 finished; --all: every one). ACTION retry or "
        "resolve acts on one transaction in attention.",
    )
    journal.add_argument("--json", action="store_true", help="a JSON array (SPEC section 5)")
    journal.add_argument("--all", action="store_true", help="include every finished one")
    journal.add_argument(
        "--state-dir", metavar="DIR", help="read the journal from here (default: the config's)"
    )
    # Options of `journal` again after the action; SUPPRESS keeps a value given before it.
    again = KioskArgumentParser(add_help=False)
    again.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help="as above")
    again.add_argument("--state-dir", metavar="DIR", default=argparse.SUPPRESS, help="as above")
    again.add_argument(
        "--by",
        metavar="NAME",
        help="who is acting (default: the Unix user; under sudo, the one who ran sudo)",
    )
    actions = journal.add_subparsers(dest="action", metavar="ACTION")
    retry = actions.add_parser(
        "retry",
        parents=[again],
        help="hand a transaction in attention back to the journal worker",
        description="Puts a transaction in attention back where the journal worker resumes "
        "it: refunding (with its refund id) if a refund was asked, else cancelling. A running "
        "`kiosk run` takes it up at its worker's next pass.",
    )
    retry.add_argument("ref", metavar="REF", help="the transaction's partner_trans_id")
    resolve = actions.add_parser(
        "resolve",
        parents=[again],
        help="record that a person settled a transaction in attention outside the kiosk",
        description="Marks a transaction in attention resolved: final, never worked on by "
        "the kiosk again. Say what was done in --note.",
    )
    resolve.add_argument("ref", metavar="REF", help="the transaction's partner_trans_id")
    resolve.add_argument(
        "--note", required=True, metavar="TEXT", help="what was done (kept in the journal)"
    )

    report = sub.add_parser(
        "report",
        parents=[common],
        help="sales by day, item and outcome; --reconcile: Alipay's money against vends",
        description="Sales by day (UTC), item and outcome, from the journal's transactions "
        "and the daily totals old ones were folded into. With --reconcile, per day: what "
        "Alipay holds (paid and not given back) against what was vended, and whether they "
        "differ.",
    )
    report.add_argument("--since", metavar="DATE", type=_day, help="first day (YYYY-MM-DD)")
    report.add_argument(
        "--until", metavar="DATE", type=_day, help="last day, included (YYYY-MM-DD)"
    )
    report.add_argument(
        "--format", choices=("table", "csv", "json"), default="table", help="default: table"
    )
    report.add_argument(
        "--reconcile",
        action="store_true",
        help="per day: what Alipay holds against what was vended",
    )
    report.add_argument(
        "--state-dir", metavar="DIR", help="read the journal from here (default: the config's)"
    )

    sim = sub.add_parser(
        "simulator", parents=[common], help="run the Alipay MAPI gateway simulator"
    )
    sim.add_argument(
        "--listen",
        default="127.0.0.1:8080",
        metavar="HOST:PORT",
        help="address to serve on (default: 127.0.0.1:8080)",
    )
    sim.add_argument("--partner", help="merchant partner id (default: from --config)")
    sim.add_argument(
        "--merchant-key",
        metavar="PEM",
        help="the merchant's public (or private) key, to verify RSA/RSA2 requests "
        "(default: the config's private_key_file)",
    )
    sim.add_argument(
        "--md5-key", metavar="FILE", help="the MD5 key (default: the config's md5_key_file)"
    )
    sim.add_argument(
        "--alipay-private-key",
        metavar="PEM",
        help="the key the simulator signs answers with; generated (and kept here) when absent",
    )
    sim.add_argument(
        "--write-alipay-public-key",
        metavar="PEM",
        help="write the simulator's public key here, for the kiosk's config",
    )
    sim.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text (with timestamps in a terminal) or one JSON object per line",
    )

    selftest = sub.add_parser(
        "selftest",
        parents=[common],
        help="check the gateway, the clock, the keys, each light, the buzzer, a scan and a vend",
    )
    selftest.add_argument(
        "--scan-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="how long to wait for the test scan (default: 30)",
    )
    selftest.add_argument(
        "--vend", action="store_true", help="also approve one test vend on a serial controller"
    )

    # Listed here for `kiosk --help`; its own parser (drivers/mdb_board.py) reads its flags,
    # so the other commands never load the emulator.
    sub.add_parser(
        "mdb-emulator",
        help="emulate a Qibixx MDB board and a vending machine on a pty, for a bench",
        add_help=False,
    )

    provision = sub.add_parser(
        "provision",
        parents=[common],
        help="install a config dropped on the boot partition",
        description="--config, if given, is where the installed config goes "
        "(a kiosk.toml; its folder is the install directory)",
    )
    provision.add_argument(
        "--from", dest="source", metavar="PATH", help="the config on the boot partition"
    )
    provision.add_argument(
        "--etc-dir",
        metavar="DIR",
        help="install directory (default: the folder of --config, else /etc/kiosk)",
    )
    provision.add_argument(
        "--operator-key",
        metavar="PUB",
        help="the operator's Ed25519 public key: install only bundles it signed "
        "(default: operator.pub in the install directory, when there)",
    )
    provision.add_argument(
        "--system-root",
        metavar="DIR",
        default="/",
        help="where [device] sets the host name, time zone and Wi-Fi (default: /)",
    )
    provision.add_argument(
        "--replace-config",
        action="store_true",
        help="without an operator key: install a kiosk.toml other than the one provisioned "
        "(by hand, as root; the boot unit never passes it)",
    )
    provision.add_argument(
        "--scrub-free-space",
        action="store_true",
        help="when secrets were taken off the boot partition, also overwrite its free space "
        "(what earlier saves of a key file left there; one write of the free space)",
    )
    provision_sub = provision.add_subparsers(dest="provision_command", metavar="sign")
    sign = provision_sub.add_parser(
        "sign",
        help="on the operator's laptop: sign a folder for the card (kiosk.toml and its files)",
        description="Writes DIR/kiosk.sig: SHA-256 of kiosk.toml and of every file it names, "
        "signed with the operator's Ed25519 key. With --keygen, makes that key pair instead.",
    )
    sign.add_argument(
        "--key", required=True, metavar="KEY", help="the operator's Ed25519 private key (PEM)"
    )
    sign.add_argument(
        "--keygen",
        action="store_true",
        help="make the operator key pair: KEY (owner-only) and KEY.pub, for the image",
    )
    sign.add_argument(
        "--passphrase",
        action="store_true",
        help="with --keygen: encrypt KEY with a passphrase (asked twice, or "
        "$KIOSK_OPERATOR_PASSPHRASE)",
    )
    sign.add_argument("folder", nargs="?", metavar="DIR", help="the folder to sign")

    from kiosk.keygen import PRIVATE_KEY, PUBLIC_KEY

    keygen = sub.add_parser(
        "keygen",
        help="make the merchant's RSA key pair on this kiosk; only the public key leaves it",
    )
    keygen.add_argument(
        "--bits", type=int, choices=(2048, 4096), default=2048, help="key size (default: 2048)"
    )
    keygen.add_argument(
        "--private-key",
        default=str(PRIVATE_KEY),
        metavar="PATH",
        help=f"where the private key goes, owner-only (default: {PRIVATE_KEY})",
    )
    keygen.add_argument(
        "--public-key",
        default=str(PUBLIC_KEY),
        metavar="PATH",
        help=f"where the public key and its upload note go (default: {PUBLIC_KEY})",
    )
    keygen.add_argument(
        "--owner",
        metavar="USER",
        help="who owns the private key (default: the service user kiosk when run as root)",
    )
    keygen.add_argument(
        "--force",
        action="store_true",
        help="replace an existing private key (its public key must then be uploaded again)",
    )
    return parser


def _day(text: str) -> date:
    """A --since/--until day: YYYY-MM-DD, nothing else."""
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        with contextlib.suppress(ValueError):
            return date.fromisoformat(text)
    raise argparse.ArgumentTypeError(f"{text!r} is not a day (YYYY-MM-DD)")


def main(argv: list[str] | None = None) -> int:
    """The one error boundary: a user's mistake is one line, `kiosk: ...`, never a traceback.
    Exceptions not named here are bugs, and keep their traceback."""
    try:
        status = _dispatch(argv)
        sys.stdout.flush()  # a closed pipe shows here, inside the boundary, not at exit
        return status
    except BrokenPipeError:
        # `kiosk journal | head -2`: the reader has all it wanted. Point stdout at devnull so
        # the interpreter's own flush at exit does not fail a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except (UsageError, ConfigError) as exc:
        _say(exc)
        return EXIT_USAGE
    except KioskError as exc:
        _say(exc)
        return EXIT_FAILURE
    except OSError as exc:
        if exc.filename is None:
            raise  # not about a file: a bug, keep the traceback
        print(f"kiosk: {Path(exc.filename).absolute()}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILURE


def _say(exc: BaseException) -> None:
    for line in str(exc).splitlines() or [type(exc).__name__]:
        print(f"kiosk: {line}", file=sys.stderr)


def _dispatch(argv: list[str] | None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["mdb-emulator"]:
        from drivers import mdb_board

        return mdb_board.main(given[1:], "kiosk mdb-emulator", KioskArgumentParser)
    args = build_parser(run_only=given[:1] == ["run"]).parse_args(given)
    match args.command:
        case "run":
            return cmd_run(args)
        case "demo":
            from kiosk.demo import run_demo

            return run_demo(
                interactive=args.interactive, log_format=args.log_format, keep=args.keep
            )
        case "check":
            from kiosk.config import run_check

            return run_check(_config_path(args), args.format)
        case "init":
            from kiosk.config import run_init

            return run_init(Path(args.path))
        case "journal":
            if args.action is not None:
                return cmd_journal_action(args)
            return cmd_journal(args)
        case "report":
            from kiosk.report import run_report

            if args.since and args.until and args.since > args.until:
                raise UsageError(f"--since {args.since} is after --until {args.until}")
            return run_report(
                _state_dir(args),
                args.since,
                args.until,
                args.format,
                args.reconcile,
                sys.stdout,
                sys.stderr,
            )
        case "simulator":
            from kiosk.simulator.serve import run_simulator

            return run_simulator(args)
        case "selftest":
            from kiosk.selftest import ask_in_terminal, run_selftest

            person = sys.stdin.isatty() and sys.stdout.isatty()
            return run_selftest(
                _config_path(args),
                args.scan_timeout,
                args.vend,
                ask=ask_in_terminal if person else None,
            )
        case "provision":
            return cmd_provision(args)
        case "keygen":
            from kiosk.keygen import run_keygen

            return run_keygen(
                Path(args.private_key).absolute(),
                Path(args.public_key).absolute(),
                args.bits,
                args.force,
                args.owner,
            )
    return EXIT_USAGE


def cmd_provision(args: argparse.Namespace) -> int:
    from kiosk import provision

    if args.provision_command == "sign":
        key = Path(args.key).absolute()
        if args.keygen:
            if args.folder is not None:
                raise UsageError("provision sign --keygen takes no DIR")
            return provision.run_operator_keygen(
                key, key.with_name(key.name + ".pub"), args.passphrase
            )
        if args.folder is None:
            raise UsageError("provision sign needs the folder to sign: DIR")
        return provision.run_sign(Path(args.folder), key)
    if args.source is None:
        raise UsageError("provision needs --from PATH (or: provision sign ...)")
    return provision.run_provision(
        Path(args.source).absolute(),
        _etc_dir(args),
        operator_key=Path(args.operator_key).absolute() if args.operator_key else None,
        system_root=Path(args.system_root).absolute(),
        replace_config=args.replace_config,
        scrub=args.scrub_free_space,
    )


def _etc_dir(args: argparse.Namespace) -> Path:
    """`provision --config` names where the installed config goes; its folder is the
    install directory, so it must be called kiosk.toml (the name the unit reads)."""
    if args.config is None:
        return Path(args.etc_dir or "/etc/kiosk").absolute()
    config = Path(args.config).absolute()
    if config.name != "kiosk.toml":
        raise UsageError(f"provision --config must name a kiosk.toml, not {config}")
    if args.etc_dir is not None and Path(args.etc_dir).absolute() != config.parent:
        raise UsageError(
            f"provision --config {config} and --etc-dir {Path(args.etc_dir).absolute()} "
            "disagree: give one"
        )
    return config.parent


# -- kiosk journal -------------------------------------------------------------------------


def _state_dir(args: argparse.Namespace) -> Path:
    if getattr(args, "state_dir", None):
        return Path(args.state_dir).absolute()
    path = _config_path(args)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read state_dir ({exc})") from None
    state_dir = Path(raw.get("kiosk", {}).get("state_dir", "/var/lib/kiosk"))
    return state_dir if state_dir.is_absolute() else path.parent / state_dir


def cmd_journal(args: argparse.Namespace) -> int:
    from kiosk.journal import JOURNAL_FILE, Journal, UnreadableRow

    state_dir = _state_dir(args)
    if not (state_dir / JOURNAL_FILE).exists():
        # Before the first `kiosk run` there is no journal: nothing has happened, no fault.
        if args.json:
            print("[]")
        else:
            print(f"no transactions yet (no journal in {state_dir})")
        return EXIT_OK
    unreadable: list[UnreadableRow] = []
    with Journal(state_dir, read_only=True) as journal:
        listed = journal.listing(include_all=args.all, unreadable=unreadable)
        actions = journal.operator_actions(t.ref for t in listed)
        rows = [t.export(actions.get(t.ref, ())) for t in listed]
    # A row this firmware cannot read is listed as such (its ref and why), never a failure.
    rows += [_unreadable_export(u) for u in unreadable]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print(f"no transactions yet in {state_dir / JOURNAL_FILE}")
        return EXIT_OK
    header = ("created_at", "ref", "amount", "state", "code", "attempts", "buyer_code")
    table = [header] + [
        (
            (r["created_at"] or "-")[:19],
            r["ref"] or f"(row {r['seq']})",
            f"{r['amount']} {r['currency']}" if r["amount"] is not None else "-",
            r["state"] + ("" if r["final"] else " *"),
            r["code"] or "-",
            str(r["attempts"]),
            r["buyer_code"] or "-",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    done = [(r["ref"], a) for r in rows for a in r["actions"]]
    if done:
        print("\noperator actions:")
    for ref, a in sorted(done, key=lambda item: item[1]["at"]):
        note = f": {a['note']}" if a["note"] else ""
        print(
            f"  {a['at'][:19]}  {ref}  {a['action']} by {a['by']} "
            f"({a['from_state']} -> {a['to_state']}){note}"
        )
    pending = sum(1 for r in rows if not r["final"])
    print(f"\n{pending} unfinished (*), {len(rows) - pending} finished shown")
    for u in unreadable:
        print(f"unreadable row {u.seq} ({u.ref or 'no ref'}): {u.why}")
    return EXIT_OK


def _unreadable_export(row: Any) -> dict[str, Any]:
    """An unreadable journal row in the shape of section 5: state `unreadable`, unfinished
    (a person must look at it), what is known of it, and why in `note`."""
    return {
        "ref": row.ref,
        "amount": None,
        "currency": None,
        "item": None,
        "state": "unreadable",
        "final": False,
        "code": None,
        "alipay_trans_id": None,
        "buyer_code": None,
        "created_at": None,
        "updated_at": None,
        "attempts": None,
        "note": row.why,
        "actions": [],
        "seq": row.seq,
    }


def cmd_journal_action(args: argparse.Namespace) -> int:
    """`kiosk journal retry|resolve REF`: one transaction in attention, recorded with who and
    when. Beside a running `kiosk run` (SQLite's locking orders the two writers); never
    migrates the journal, which is the daemon's to do."""
    from kiosk.errors import ActionRefused
    from kiosk.journal import JOURNAL_FILE, Journal
    from kiosk.log import mask_codes

    if args.json or args.all:
        raise UsageError(f"--json and --all are for the listing, not for {args.action}")
    who = mask_codes(_operator(args.by))
    state_dir = _state_dir(args)
    if not (state_dir / JOURNAL_FILE).exists():
        raise UsageError(f"no transaction {args.ref}: no journal in {state_dir} yet")
    try:
        with Journal(state_dir, migrate=False) as journal:
            if args.action == "retry":
                txn = journal.retry_attention(args.ref, who)
            else:
                note = _text(args.note, "--note", 500)
                txn = journal.resolve_attention(args.ref, who, mask_codes(note))
    except ActionRefused as exc:
        raise UsageError(str(exc)) from None
    if args.action == "retry":
        print(
            f"{txn.ref}: attention -> {txn.state.value}, retried by {who} at {txn.updated_at}; "
            "the journal worker of a running kiosk takes it up at its next pass"
        )
    else:
        print(f"{txn.ref}: attention -> resolved (final), by {who} at {txn.updated_at}")
    return EXIT_OK


def _operator(by: str | None) -> str:
    """Who acts: --by, else the Unix user (the one who ran sudo, under sudo)."""
    if by is not None:
        return _text(by, "--by", 64)
    import pwd

    uid = os.getuid()
    if uid == 0 and os.environ.get("SUDO_USER"):
        return _text(os.environ["SUDO_USER"], "SUDO_USER", 64)
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _text(value: str, what: str, limit: int) -> str:
    text = value.strip()
    if not text:
        raise UsageError(f"{what} is empty")
    if len(text) > limit:
        raise UsageError(f"{what} is {len(text)} characters; at most {limit}")
    if any(not ch.isprintable() for ch in text):
        raise UsageError(f"{what} holds a control character")
    return text


# -- kiosk run ------------------------------------------------------------------------------


# SIGHUPs taken while the kiosk starts, before it can reload: SIGHUP's default action would end
# the process (a reload sent during start-up, a crash to systemd). The config read next is the
# new one; one read before the kiosk runs is followed by a reload. Appended to only: a handler
# must not take a lock its own thread may hold.
_EARLY_RELOADS: list[int] = []


def _note_early_reload(signum: int, frame: object) -> None:
    _EARLY_RELOADS.append(signum)


def cmd_run(args: argparse.Namespace) -> int:
    """The daemon. A bad config or an unreadable journal does not crash-loop the service: the
    kiosk reports itself out of service and waits for SIGHUP (config fixed) or SIGTERM. In a
    terminal it says what is wrong and exits instead (2 for the config, 1 for the journal).
    The scanner is grabbed first of all, and held while it waits (kiosk/scanner_hold.py)."""
    signal.signal(signal.SIGHUP, _note_early_reload)
    without_text_guessing()
    import drivers
    from kiosk.scanner_hold import HeldScanner

    setup_logging(args.log_format)
    if not in_terminal():  # for the journal: which firmware started; a person sees the prompt
        event(log, "kiosk.starting", version=__version__, pid=os.getpid())
    path = _config_path(args)
    held = HeldScanner(drivers.build_scanner_for)
    held.hold_early(path)
    try:
        return _serve(path, held)
    finally:
        held.release()


def without_text_guessing() -> None:
    """requests loads a character set detector (charset_normalizer, about 2.8 MiB resident) to
    guess the text of an answer that names no charset. The kiosk reads every gateway answer as
    bytes (kiosk/alipay/xml.py) and never asks requests for text, so the daemon goes without it:
    requests supports that (it then takes such text as UTF-8) and only warns at import."""
    for name in ("charset_normalizer", "chardet"):
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # importing it fails
    warnings.filterwarnings(
        "ignore", message="Unable to find acceptable character detection", module="requests"
    )


def _serve(path: Path, held: HeldScanner) -> int:
    from kiosk.config import load_config
    from kiosk.systemd import Notifier

    # A file size limit must fail a journal write (and stop payments), not kill the kiosk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    notifier = Notifier()
    while True:
        _EARLY_RELOADS.clear()  # the config read now is the one any SIGHUP so far asked for
        try:
            if not path.exists():
                raise ConfigError(f"no config at {path} (give --config PATH or set $KIOSK_CONFIG)")
            config = load_config(path)
            from kiosk.journal import Journal

            lock_state_dir(config.kiosk.state_dir)
            journal = Journal(config.kiosk.state_dir)
        except (ConfigError, JournalError) as exc:
            if in_terminal():
                raise  # a person is watching: say what is wrong and stop (main prints it)
            what = "config" if isinstance(exc, ConfigError) else "journal"
            for line in str(exc).splitlines():
                event(log, f"{what}.invalid", level=logging.ERROR, problem=line)
            if _wait_out_of_service(notifier, f"{what}: {str(exc).splitlines()[0]}"):
                held.hold_early(path)  # the new config's scanner
                continue  # SIGHUP: try again
            return EXIT_OK
        status = _run_kiosk(config, journal, path, notifier, held)
        if status is not None:
            return status
        held.hold_early(path)  # SIGHUP after a driver failed


def in_terminal() -> bool:
    """A person at a terminal, not systemd: problems are reported and the command ends,
    rather than waiting out of service for a SIGHUP nobody will send."""
    if under_systemd():
        return False
    return sys.stdin.isatty() or sys.stderr.isatty()


def _wait_out_of_service(notifier: object, reason: str) -> bool:
    """Sit out of service until SIGHUP (True) or SIGTERM (False), keeping the watchdog fed."""
    from kiosk.systemd import Notifier

    assert isinstance(notifier, Notifier)
    why: list[str] = []

    def on_signal(signum: int, frame: object) -> None:
        # Only a note: a handler that took a lock (Event.set) could interrupt its own thread
        # inside that lock and hang. The C handler's write to the wakeup fd ends the select.
        why.append("hup" if signum == signal.SIGHUP else "term")

    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    handlers[signal.SIGHUP] = _note_early_reload  # from here until the kiosk runs again
    for sig in handlers:
        signal.signal(sig, on_signal)
    try:
        event(log, "indicator", state="out_of_service")
        event(log, "kiosk.out_of_service", level=logging.ERROR, reason=reason)
        notifier.ready(f"out of service: {reason}")
        interval = notifier.watchdog_interval_s or 3600.0
        while not why:
            readable, _, _ = select.select([read_fd], [], [], interval)
            if readable:
                os.read(read_fd, 64)
            elif not why:
                notifier.watchdog()
    finally:
        # A signal after this wait is not lost in a list nobody reads any more.
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(previous)
        os.close(write_fd)
        os.close(read_fd)
    if "term" not in why:  # a stop and a reload in one wait: the stop wins
        event(log, "config.reload")
        return True
    notifier.stopping()
    return False


def _run_kiosk(
    config: object, journal: object, path: Path, notifier: object, held: HeldScanner
) -> int | None:
    """The kiosk until it stops (its exit status), or None for a SIGHUP after its drivers
    could not be built (the caller starts over)."""
    # Start-up's garbage (every command's parser, the config file's parse) sits in cycles the
    # collector would reach late, if ever, on an idle kiosk: collected now, its memory takes
    # the daemon's modules loaded next instead of the heap growing for them.
    gc.collect()
    import drivers
    from kiosk.config import Config, load_config
    from kiosk.daemon import Kiosk
    from kiosk.journal import Journal
    from kiosk.systemd import Notifier

    assert isinstance(config, Config) and isinstance(journal, Journal)
    assert isinstance(notifier, Notifier)
    try:
        held.hold(config.scanner)  # the one held since the start, unless the config changed it
        scanner = held
        indicator = drivers.build_indicator(config)
        vend = drivers.build_vend_output(config)
    except Exception as exc:  # a driver library missing, a pin busy: say which, stay up
        journal.close()
        if in_terminal():
            if isinstance(exc, KioskError):
                raise
            raise KioskError(f"driver: {exc}") from exc
        event(log, "driver.failed", level=logging.ERROR, error=str(exc))
        if _wait_out_of_service(notifier, f"driver: {exc}"):
            return None  # SIGHUP: start over, the scanner still held
        return EXIT_OK
    kiosk = Kiosk(
        config,
        scanner=scanner,
        indicator=indicator,
        vend=vend,
        journal=journal,
        notifier=notifier,
        reload_config=lambda: load_config(path),
    )
    signal.signal(signal.SIGTERM, lambda s, f: kiosk.stop())
    signal.signal(signal.SIGINT, lambda s, f: kiosk.stop())
    signal.signal(signal.SIGHUP, lambda s, f: kiosk.reload())
    if _EARLY_RELOADS:  # taken after the config was read: it may have changed since
        _EARLY_RELOADS.clear()
        event(log, "config.reload_early")
        kiosk.reload()
    try:
        with logging_in_background(), _signals_wake(lambda: kiosk.events.put(("wake", None))):
            return kiosk.run()
    finally:
        journal.close()


@contextlib.contextmanager
def _signals_wake(wake: Callable[[], None]) -> Iterator[None]:
    """Wake the loop for every signal. Python runs a signal's handler on the main thread, but
    the kernel may deliver the signal to any thread; the main thread, blocked waiting on its
    queue, would then run the handler only when something else woke it (seen: SIGHUP taken
    ten seconds late). The C handler writes to the wakeup fd whichever thread took it."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def relay() -> None:
        while True:
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return
            if not data:
                return
            wake()

    thread = threading.Thread(target=relay, name="signal-wakeup", daemon=True)
    thread.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous)
        os.close(write_fd)  # the relay reads end-of-file and returns
        thread.join(5)
        os.close(read_fd)


# -- one `kiosk run` per state directory ---------------------------------------------------

_held_locks: dict[Path, int] = {}  # lock file -> open descriptor, for the process's life


def lock_state_dir(state_dir: Path) -> None:
    """Take `state_dir/kiosk.lock` exclusively (flock) for the rest of the process's life, or
    raise StateDirInUse naming the holder: two daemons on one journal would each resume the
    other's sales. The kernel drops the lock when the process ends, however it ends.
    `kiosk journal` reads without it."""
    path = (Path(state_dir) / LOCK_FILE).absolute()
    if path in _held_locks:
        return
    with contextlib.suppress(OSError):  # if it cannot be made, the journal says why
        path.parent.mkdir(parents=True, exist_ok=True)
    writable = True
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        writable = False  # a read-only state directory: a read descriptor locks as well
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            # Nothing can be written there, by this kiosk or a second one: the journal
            # reports the fault and the kiosk stays out of service.
            event(log, "kiosk.lock_unavailable", path=str(path), error=exc.strerror or str(exc))
            return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _lock_holder(fd)
        os.close(fd)
        pid = f" (pid {holder})" if holder else ""
        raise StateDirInUse(f"another kiosk run{pid} holds {path}") from None
    if writable:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held_locks[path] = fd


def _lock_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""
