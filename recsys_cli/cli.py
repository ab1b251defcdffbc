"""The `recsys` command line. Reference: docs/reference/cli.md.

Exit codes: 0 success; 1 a failed step or blocking check, or output cut short by a closed pipe; 2 bad usage
or configuration.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import sys
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from recsys_cli.ports import port_problem
from recsys_core.lake import partition_dir
from recsys_core.object_store import pull_trees, push_trees
from recsys_core.settings import MAX_SERVE_WORKERS, ConfigError, Settings, load_settings, tuned_file

if TYPE_CHECKING:
    from recsys_core.manifest import Manifest
    from recsys_core.rules import RulesDocument
    from recsys_dagster.runner import RunOutcome

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_UI_URL = "http://127.0.0.1:3000"


class UsageError(Exception):
    """Bad arguments: reported on stderr with exit code 2."""


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date like 2025-01-31, got {text!r}") from None


def _moment(text: str) -> dt.datetime:
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        moment = None
    if moment is None or moment.utcoffset() is None:
        raise argparse.ArgumentTypeError(
            f"expected a time with a time zone like 2026-06-01T00:00:00Z, got {text!r}"
        )
    return moment.astimezone(dt.UTC)


def _yesterday() -> dt.date:
    return dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recsys", description="Recommendation artifacts from raw event logs."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="write synthetic events into the raw landing zone")
    gen.add_argument("--end", type=_date, default=None, help="last day (default: yesterday, UTC)")
    gen.add_argument("--days", type=int, default=14, help="number of days ending at --end (default 14)")
    gen.add_argument("--events-per-day", type=int, default=100_000, help="events per day (default 100000)")
    gen.add_argument("--seed", type=int, default=42, help="random seed; same seed, same files (default 42)")
    gen.add_argument("--tenants", type=_csv, default=["demo"], help="comma-separated tenants (default demo)")
    gen.add_argument(
        "--surfaces", type=_csv, default=["home"], help="comma-separated surfaces (default home)"
    )
    gen.add_argument("--users", type=int, default=20_000, help="distinct users (default 20000)")
    gen.add_argument("--items", type=int, default=5_000, help="distinct items (default 5000)")
    gen.add_argument(
        "--malformed-per-day",
        type=int,
        default=0,
        help="malformed lines mixed into each day, each breaking one contract rule (default 0)",
    )

    imp = sub.add_parser(
        "import",
        help="split foreign event files into the raw landing zone by event date, and land item catalogs",
    )
    imp.add_argument("paths", nargs="+", type=Path, help="files to import")
    imp.add_argument(
        "--format", default="auto", choices=["auto", "jsonl", "movielens", "otto", "catalog", "movies"]
    )
    imp.add_argument("--tenant", help="tenant for formats without one (MovieLens, OTTO, movies.csv)")
    imp.add_argument("--surface", help="surface for event formats without one (MovieLens, OTTO)")
    imp.add_argument(
        "--day",
        type=_date,
        default=None,
        help="landing day of catalog files (default: the first day events landed, else today)",
    )

    evaluate = sub.add_parser(
        "evaluate", help="run the offline evaluation of a date range and show each day's metrics and verdict"
    )
    evaluate.add_argument("--start", type=_date, default=None, help="first day (default: yesterday, UTC)")
    evaluate.add_argument("--end", type=_date, default=None, help="last day, inclusive (default: --start)")
    evaluate.add_argument("--quiet", action="store_true", help="only print the summary")

    tune = sub.add_parser(
        "tune",
        help="search ALS parameters and blend weights on the data before a day's evaluation days; "
        "the next run trains and serves with the choice",
    )
    tune.add_argument(
        "--as-of",
        type=_date,
        default=None,
        help="day whose evaluation days are left out (default: yesterday)",
    )
    tune.add_argument("--trials", type=int, default=None, help="trials to run (default: tuning.trials)")
    tune.add_argument("--quiet", action="store_true", help="only print the summary")

    run = sub.add_parser("run", help="materialize a date range in-process (same definitions as the UI)")
    run.add_argument("--start", type=_date, default=None, help="first day (default: yesterday, UTC)")
    run.add_argument("--end", type=_date, default=None, help="last day, inclusive (default: --start)")
    run.add_argument(
        "--select",
        default=None,
        help='assets in Dagster selection syntax, e.g. "key:canonical_events" or "key:canonical_events+"',
    )
    run.add_argument(
        "--every-day",
        action="store_true",
        help="build, evaluate and publish as of every day of the range, not only as of its last day",
    )
    run.add_argument("--quiet", action="store_true", help="only print the summary")

    status = sub.add_parser("status", help="per-partition state of the lake")
    status.add_argument("--start", type=_date, default=None, help="first day (default: --days before --end)")
    status.add_argument("--end", type=_date, default=None, help="last day (default: yesterday, UTC)")
    status.add_argument("--days", type=int, default=14, help="days to show when --start is not given")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    history = sub.add_parser(
        "history", help="registry records of one tenant/surface (publishes, rollbacks, ...)"
    )
    history.add_argument("--tenant", required=True)
    history.add_argument("--surface", required=True)
    history.add_argument("--limit", type=int, default=20, help="newest records to show (default 20; 0 = all)")
    history.add_argument("--json", action="store_true", help="machine-readable output")

    rollback = sub.add_parser("rollback", help="re-point the current manifest to an earlier published one")
    rollback.add_argument("--tenant", required=True)
    rollback.add_argument("--surface", required=True)
    target = rollback.add_mutually_exclusive_group(required=True)
    target.add_argument("--to", dest="to_version", help="manifest version (or a unique prefix of it)")
    target.add_argument("--steps", type=int, help="go back N manifests that were current")
    rollback.add_argument("--reason", required=True, help="why (recorded in the registry)")

    gc = sub.add_parser(
        "gc", help="delete artifact versions no kept manifest references (dry run by default)"
    )
    gc.add_argument("--keep", type=int, required=True, help="keep the artifacts of the N newest manifests")
    gc.add_argument("--apply", action="store_true", help="really delete (default: only list)")
    gc.add_argument(
        "--min-age-hours", type=float, default=1.0, help="never delete anything younger (default 1)"
    )

    serve = sub.add_parser(
        "serve",
        help="serve the HTTP API from the current manifests",
        description="Serve the HTTP API from the current manifest of every tenant and surface under "
        "RECSYS_ARTIFACT_ROOT, swapping in newly published ones without a restart. Ctrl-C or SIGTERM stops "
        "it: requests in flight finish (within RECSYS_SERVE_SHUTDOWN_GRACE_SECONDS) and the exposure log "
        "is written out first.",
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; 0.0.0.0 accepts connections from other machines (default 127.0.0.1)",
    )
    serve.add_argument("--port", type=int, default=8000, help="port to listen on, 1-65535 (default 8000)")
    serve.add_argument(
        "--workers",
        type=int,
        help="worker processes, 1-256; each loads every artifact into its own memory; /metrics reports "
        "them all; RECSYS_SERVE_WORKERS sets the default (default 1)",
    )

    ui = sub.add_parser(
        "ui",
        help="start the Dagster UI (webserver + daemon) on the same RECSYS_HOME",
        description="Start the Dagster UI (dagster dev: webserver, daemon, code server) on the same "
        "RECSYS_HOME and DAGSTER_HOME as the other commands. The daemon runs the schedules and the alert "
        "sensors. Ctrl-C stops it.",
    )
    ui.add_argument("--host", default="127.0.0.1", help="address of the web UI (default 127.0.0.1)")
    ui.add_argument("--port", type=int, default=3000, help="port of the web UI, 1-65535 (default 3000)")

    sql = sub.add_parser(
        "sql", help="print a SQL file of dbt_like_sql/ with the pipeline's parameters, to paste into DuckDB"
    )
    sql.add_argument("model", help="the file without .sql, e.g. pair_daily, cooc, checks/canonical_null_keys")
    day = sql.add_mutually_exclusive_group()
    day.add_argument("--day", type=_date, help="partition of a daily aggregate or canonical check")
    day.add_argument("--as-of", type=_date, help="as-of day of a window artifact")
    sql.add_argument("--lake-root", type=Path, help="lake to read (default: the configured one)")

    rules = sub.add_parser("rules", help="merchandising rules: validate, publish, show")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True, metavar="ACTION")
    rules_validate = rules_sub.add_parser(
        "validate", help="check a rules file (YAML or JSON) without publishing"
    )
    rules_validate.add_argument("file", type=Path)
    rules_publish = rules_sub.add_parser(
        "publish", help="publish a rules file for one tenant/surface (a new manifest; roll back as usual)"
    )
    rules_publish.add_argument("file", type=Path)
    rules_show = rules_sub.add_parser("show", help="print the rules in force for one tenant/surface")
    for command in (rules_publish, rules_show):
        command.add_argument("--tenant", required=True)
        command.add_argument("--surface", required=True)
    rules_publish.add_argument("--reason", required=True, help="why (recorded in the registry)")
    rules_publish.add_argument(
        "--dry-run",
        action="store_true",
        help="publish nothing: replay a sample of recent requests through the rules in force and these "
        "rules, and report what would change",
    )
    rules_publish.add_argument(
        "--sample",
        type=int,
        default=None,
        help="with --dry-run: requests to replay (default 200, at most 10000)",
    )
    rules_publish.add_argument(
        "--at",
        type=_moment,
        default=None,
        help="with --dry-run: the time rule windows are evaluated at, ISO 8601 with a time zone "
        "(default: now)",
    )
    rules_publish.add_argument("--json", action="store_true", help="with --dry-run: the report as JSON")

    audit = sub.add_parser("audit", help="look up landed decision traces by request id or by user and time")
    audit.add_argument("--tenant", required=True)
    audit.add_argument("--surface", required=True)
    lookup = audit.add_mutually_exclusive_group(required=True)
    lookup.add_argument("--request-id", help="the response's request id (X-Request-ID)")
    lookup.add_argument("--user-id", help="every traced response of this user")
    audit.add_argument("--since", type=_date, help="with --user-id: from this day (UTC, inclusive)")
    audit.add_argument("--until", type=_date, help="with --user-id: up to this day (UTC, inclusive)")
    audit.add_argument("--limit", type=int, default=20, help="newest traces to print (default 20)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = _dispatch(args)
        sys.stdout.flush()  # inside the try: a reader that went away is reported here, not at exit
        return status
    except BrokenPipeError:
        # The reader of the output went away (`recsys status | head -3`): stop quietly, as other command-line
        # tools do. Python would report the unwritten rest again when it flushes stdout at exit, so
        # stdout goes to /dev/null from here on.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_FAILED


def _dispatch(args: argparse.Namespace) -> int:
    try:
        settings = load_settings()
        handler = {
            "generate": cmd_generate,
            "import": cmd_import,
            "run": cmd_run,
            "evaluate": cmd_evaluate,
            "tune": cmd_tune,
            "status": cmd_status,
            "history": cmd_history,
            "rollback": cmd_rollback,
            "gc": cmd_gc,
            "serve": cmd_serve,
            "ui": cmd_ui,
            "sql": cmd_sql,
            "rules": cmd_rules,
            "audit": cmd_audit,
        }
        return handler[args.command](args, settings)
    except (UsageError, ConfigError) as exc:
        print(f"recsys {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE


def cmd_generate(args: argparse.Namespace, settings: Settings) -> int:
    from recsys_dagster.ingest.generate import generate_events

    end = args.end or _yesterday()
    try:
        report = generate_events(
            settings.raw_root,
            end_date=end,
            days=args.days,
            events_per_day=args.events_per_day,
            seed=args.seed,
            tenants=args.tenants,
            surfaces=args.surfaces,
            n_users=args.users,
            n_items=args.items,
            malformed_per_day=args.malformed_per_day,
            progress=print,
        )
    except ValueError as exc:  # the generator validates its arguments
        raise UsageError(str(exc)) from exc
    first = end - dt.timedelta(days=args.days - 1)
    push_trees(settings.raw_root)
    where = settings.storage_url or settings.raw_root
    print(f"generated {report.total_events:,} events for {first}..{end} into {where}")
    if report.malformed_lines:
        counts = ", ".join(f"{reason} {n:,}" for reason, n in report.malformed_lines.items())
        print(f"plus {sum(report.malformed_lines.values()):,} malformed lines, by expected reason: {counts}")
    return EXIT_OK


def cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    from recsys_dagster.ingest.importers import (
        CATALOG_FORMATS,
        default_catalog_day,
        detect_format,
        import_file,
    )

    for path in args.paths:
        if not path.is_file():
            raise UsageError(f"{path}: no such file")
    formats = {}
    for path in args.paths:
        try:
            formats[path] = detect_format(path) if args.format == "auto" else args.format
        except ValueError as exc:
            raise UsageError(f"{path}: {exc}") from exc
    # Events first: a catalog without --day lands on the first day events landed, these ones included.
    catalogs = [path for path in args.paths if formats[path] in CATALOG_FORMATS]
    first_days, last_days = [], []
    for path in [*(p for p in args.paths if p not in catalogs), *catalogs]:
        catalog_day = args.day
        if formats[path] in CATALOG_FORMATS and catalog_day is None:
            catalog_day, why = default_catalog_day(settings.raw_root, dt.datetime.now(dt.UTC).date())
            print(f"{path}: catalog landing day {catalog_day}: {why} (--day chooses another)")
        try:
            report = import_file(
                path,
                settings.raw_root,
                fmt=formats[path],
                tenant=args.tenant,
                surface=args.surface,
                progress=print,
                catalog_day=catalog_day,
            )
        except ValueError as exc:
            raise UsageError(f"{path}: {exc}") from exc
        if report.feed == "catalog":
            print(
                f"{path}: {report.format}, {report.events_written:,} catalog records into "
                f"{settings.raw_root / 'catalog' / f'dt={catalog_day}'}; the pipeline's catalog holds "
                f"them from {catalog_day} on"
            )
            continue
        span = f" {report.first_day}..{report.last_day}" if report.first_day else ""
        print(
            f"{path}: {report.format}, {report.events_written:,} events into {len(report.per_day):,} day(s)"
            f"{span}"
            + (
                f", {report.undated_lines:,} undatable line(s) kept for quarantine"
                if report.undated_lines
                else ""
            )
        )
        if report.first_day and report.last_day:
            first_days.append(report.first_day)
            last_days.append(report.last_day)
    push_trees(settings.raw_root)
    if first_days:
        first, last = min(first_days), max(last_days)
        print(f"landing zone: {settings.storage_url or settings.raw_root}")
        days = (dt.date.fromisoformat(str(last)) - dt.date.fromisoformat(str(first))).days + 1
        prefix = ""
        if dt.date.fromisoformat(str(first)) < settings.start_date:
            print(
                f"note: events start on {first}, before RECSYS_START_DATE={settings.start_date}: the command "
                "below sets it (export it, or add it to your environment, for later commands and the UI)"
            )
            prefix = f"RECSYS_START_DATE={first} "
        print(
            f"next ({days:,} day{'s' if days > 1 else ''}): {prefix}recsys run --start {first} --end {last}"
        )
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    """`recsys run --select key:evaluation` over the range, then each day's evaluation per target."""
    from recsys_core.manifest import list_targets
    from recsys_dagster.evaluation.offline import read_evaluation

    args.select, args.every_day = "key:evaluation", False
    status = cmd_run(args, settings)
    metric = settings.pipeline.guardrails.metric
    print()
    print(f"{'day':<10}  {'target':<24}  {'users':>6}  {metric + ' by model':<52}  verdict")
    start = args.start or _yesterday()
    day = start
    while day <= (args.end or start):
        for tenant, surface in list_targets(settings.artifact_root) or []:
            record = read_evaluation(settings.lake_root, day, tenant, surface)
            if record is None:
                continue
            result = record.get("result") or {}
            values = ", ".join(
                f"{model} {segments['all'][metric]:.4f}"
                for model, segments in result.get("metrics", {}).items()
                if "all" in segments
            )
            verdict = "passed" if record["passed"] else "FAILED: " + "; ".join(record["violations"])
            if record.get("note"):
                verdict += f" ({record['note']})"
            users = result.get("users", {}).get("all", 0)
            print(f"{day.isoformat():<10}  {tenant + '/' + surface:<24}  {users:>6}  {values:<52}  {verdict}")
        day += dt.timedelta(days=1)
    return status


def cmd_tune(args: argparse.Namespace, settings: Settings) -> int:
    """`recsys run --select key:tuning` for one day, then the trials and the choice."""
    from recsys_dagster.evaluation.tuning import CHOICE_FILE, TRIALS_FILE, TUNING_ASSET

    if args.trials is not None:
        if args.trials < 1:
            raise UsageError(f"--trials must be >= 1, got {args.trials}")
        os.environ["RECSYS_TUNING_TRIALS"] = str(args.trials)  # read by the pipeline's settings
    args.select, args.every_day = f"key:{TUNING_ASSET}", False
    args.start = args.end = args.as_of or _yesterday()
    status = cmd_run(args, settings)
    folder = partition_dir(settings.lake_root, TUNING_ASSET, args.start)
    if status != EXIT_OK or not (folder / CHOICE_FILE).is_file():
        return status
    choice = json.loads((folder / CHOICE_FILE).read_text())
    print()
    print(
        f"tuned as of {choice['as_of']}: trained up to {choice['trained_as_of']}, validated on "
        f"{' .. '.join(choice['validation_days'])} ({choice['users']} users), {choice['trials']} trials"
    )
    for label, entry in (("before", choice["baseline"]), ("chosen", choice["chosen"])):
        score = entry["score"]
        params = ", ".join(f"{k} {v}" for k, v in entry["params"].items())
        print(
            f"  {label}: blend {choice['metric']} {score['blend']:.4f} (als alone {score['als']:.4f}): {params}"
        )
    print(f"trials: {folder / TRIALS_FILE}")
    print(f"chosen parameters: {tuned_file(settings.lake_root)} (used by the next run and the served blend)")
    return status


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    start = args.start or _yesterday()
    end = args.end or start
    if end < start:
        raise UsageError(f"--end {end} is before --start {start}")
    if start < settings.start_date:
        raise UsageError(
            f"--start {start} is before the first partition RECSYS_START_DATE={settings.start_date}"
        )
    if end > _yesterday():
        raise UsageError(f"--end {end} is not a complete day yet; the last partition is {_yesterday()}")
    import dagster as dg

    # Beta/preview notices about Dagster APIs are for developers, not for people running the pipeline.
    for category in (dg.BetaWarning, dg.PreviewWarning):
        warnings.filterwarnings("ignore", category=category)
    from recsys_dagster.runner import SelectionError, fail_orphaned_runs, materialize_ranges, prepare_instance

    with prepare_instance(settings) as instance:
        for run_id in fail_orphaned_runs(instance):
            print(
                f"run {run_id}: marked FAILED: the recsys run that executed it on this host was killed or crashed"
            )
    plan = _run_plan(start, end, args.select, args.every_day)
    try:
        # A failed run ends the plan: the window of the last day holds the failed days, nothing could publish.
        outcomes = materialize_ranges(
            settings,
            [(s, e, selection) for s, e, selection, _ in plan],
            "ERROR" if args.quiet else "INFO",
            on_wait=lambda line: print(line, flush=True),
        )
    except SelectionError as exc:
        raise UsageError(f"invalid --select {args.select!r}: {exc}") from exc
    _print_partition_table(settings, start, end)
    for outcome, (_, _, _, what) in zip(outcomes, plan, strict=False):
        print()
        _print_run_outcome(settings, outcome, what, start, end)
    return EXIT_OK if all(outcome.ok for outcome in outcomes) else EXIT_FAILED


# The assets a range's earlier days need: the window assets of the last day read their aggregates.
DAILY_DATA_SELECTION = "group:ingest or group:aggregates"


def _run_plan(
    start: dt.date, end: dt.date, selection: str | None, every_day: bool
) -> list[tuple[dt.date, dt.date, str | None, str]]:
    """The runs of `recsys run`: (first day, last day, asset selection or None for the daily job, what).

    Publishing only moves forward in as-of, so in a range only the last day's manifest can become current:
    building, evaluating and publishing the window artifacts as of every earlier day would cost most of a
    backfill for manifests nobody serves. A range without --select therefore runs twice: ingestion and the
    daily aggregates for the earlier days, then the daily job for the last day (whose window reads them).
    """
    if selection is not None or every_day or start == end:
        return [(start, end, selection, "")]
    before = end - dt.timedelta(days=1)
    return [
        (start, before, DAILY_DATA_SELECTION, f"{start}..{before}: ingestion and daily aggregates"),
        (end, end, None, f"{end}: the daily job, as of the last day"),
    ]


def _print_run_outcome(
    settings: Settings, outcome: RunOutcome, what: str, start: dt.date, end: dt.date
) -> None:
    print(f"run {outcome.run_id}: {'succeeded' if outcome.ok else 'FAILED'}{f'  ({what})' if what else ''}")
    for name in outcome.failed_checks:
        print(f"  blocking check failed: {name}")
    if outcome.failed_checks:
        _print_gate_failures(settings, start, end)
    for name in outcome.warned_checks:
        print(f"  warning check failed: {name}")
    for step in outcome.failed_steps:
        print(f"  step failed: {step}")
    for error in outcome.errors:
        print(f"    {error.splitlines()[0]}")
    for step in outcome.skipped_steps:
        print(f"  step skipped: {step}")
    ui_url = (os.environ.get("RECSYS_UI_URL") or DEFAULT_UI_URL).rstrip("/")
    print(f"inspect it in the Dagster UI: make ui, then {ui_url}/runs/{outcome.run_id}")


def _print_gate_failures(settings: Settings, start: dt.date, end: dt.date) -> None:
    """Each failed blocking gate of the range: its day, its reason and the settings that move it."""
    from recsys_dagster.ingest.gates import GATE_SETTINGS

    day = start
    while day <= end:
        record, _ = _partition_record(settings, day, CHECKS_RECORD)  # the table reports an unreadable one
        for result in record["results"] if record else []:
            if result["passed"] or not result["blocking"]:
                continue
            keys = GATE_SETTINGS.get(result["name"], ())
            relax = (f"set {', '.join(keys)} in RECSYS_CONFIG, or " if keys else "") + (
                f"list {result['name']} in checks.warn_only to warn instead of block"
            )
            print(f"    {day} {result['name']}: {result['summary']} ({relax})")
        day += dt.timedelta(days=1)


@dataclass(frozen=True)
class RecordFile:
    """A record file of a canonical_events partition and the fields `recsys status` and `recsys run` read."""

    name: str
    fields: tuple[str, ...]
    result_fields: tuple[str, ...] = ()  # the fields of each entry of its `results`


# The checks column of a day whose record file cannot be read (the error, on stderr, names the file).
UNREADABLE = "UNREADABLE record (see the error)"
SUMMARY_RECORD = RecordFile(
    "_summary.json", ("lines_read", "canonical_rows", "quarantined", "duplicates", "blank_lines", "reasons")
)
CHECKS_RECORD = RecordFile("_checks.json", ("passed", "results"), ("name", "passed", "blocking", "summary"))


def _partition_record(settings: Settings, day: dt.date, kind: RecordFile) -> tuple[dict | None, str | None]:
    """A record file of a day's canonical_events partition, or why it cannot be read.

    (None, None) when the file does not exist; (None, problem) when it is not JSON or lacks a field the
    CLI reads, the problem naming the file: one damaged file must not hide the state of every other day.
    """
    from recsys_core.lake import RecordError, partition_dir, read_json_record

    path = partition_dir(settings.lake_root, "canonical_events", day) / kind.name
    try:
        record = read_json_record(path)
    except RecordError as exc:
        return None, str(exc)
    except OSError as exc:
        return None, f"{path} cannot be read: {exc}"
    if record is None:
        return None, None
    if not isinstance(record, dict):
        return None, f"{path} cannot be read: not a JSON object"
    missing = [field for field in kind.fields if field not in record]
    results = record.get("results", [])
    if not isinstance(results, list) or not all(
        isinstance(r, dict) and set(kind.result_fields) <= r.keys() for r in results
    ):
        missing.append(f"results with {', '.join(kind.result_fields)}")
    if missing:
        return None, f"{path} cannot be read: it lacks {', '.join(missing)}"
    return record, None


def partition_rows(settings: Settings, start: dt.date, end: dt.date) -> list[dict]:
    """One row per day of the range: the counts and check results of its canonical_events partition.

    A row whose record files cannot be read lists why under `errors`.
    """
    rows = []
    day = start
    while day <= end:
        summary, summary_error = _partition_record(settings, day, SUMMARY_RECORD)
        record, checks_error = _partition_record(settings, day, CHECKS_RECORD)
        row: dict = {"day": day.isoformat(), "materialized": summary is not None or summary_error is not None}
        errors = [error for error in (summary_error, checks_error) if error]
        if errors:
            row["errors"] = errors
        if summary:
            row |= {
                "lines": summary["lines_read"],
                "events": summary["canonical_rows"],
                "quarantined": summary["quarantined"],
                "duplicates": summary["duplicates"],
                "blank": summary["blank_lines"],
                "reasons": summary["reasons"],
            }
        if record:
            failed = [r["name"] for r in record["results"] if not r["passed"] and r["blocking"]]
            warned = [r["name"] for r in record["results"] if not r["passed"] and not r["blocking"]]
            row["checks"] = ("failed: " + ", ".join(failed)) if failed else "passed"
            if warned:
                row["checks"] += " (warnings: " + ", ".join(warned) + ")"
            row["checks_passed"] = record["passed"]
        rows.append(row)
        day += dt.timedelta(days=1)
    return rows


def _print_partition_table(settings: Settings, start: dt.date, end: dt.date) -> bool:
    """The partition table of the range; False when a record file could not be read (each is named)."""
    rows = partition_rows(settings, start, end)
    header = f"{'day':<10}  {'lines':>10}  {'events':>10}  {'quarantined':>11}  {'duplicates':>10}  {'blank':>6}  checks"
    print(header)
    print("-" * len(header))
    reasons: dict[str, int] = {}
    for row in rows:
        if "lines" not in row:
            state = UNREADABLE if row["materialized"] else "not materialized"
            print(f"{row['day']:<10}  {'-':>10}  {'-':>10}  {'-':>11}  {'-':>10}  {'-':>6}  {state}")
            continue
        for code, count in row["reasons"].items():
            reasons[code] = reasons.get(code, 0) + count
        print(
            f"{row['day']:<10}  {row['lines']:>10,}  {row['events']:>10,}  {row['quarantined']:>11,}  "
            f"{row['duplicates']:>10,}  {row['blank']:>6,}  "
            + (UNREADABLE if row.get("errors") else row.get("checks", "not checked"))
        )
    if reasons:
        print("quarantined lines by reason: " + ", ".join(f"{k} {v:,}" for k, v in sorted(reasons.items())))
    damaged = [row for row in rows if row.get("errors")]
    for row in damaged:
        for error in row["errors"]:
            print(f"error: {error}", file=sys.stderr)
    if damaged:
        print(
            "a damaged record file is rewritten when its day is materialized again: recsys run "
            f"--start {damaged[0]['day']} --end {damaged[-1]['day']} --select key:canonical_events",
            file=sys.stderr,
        )
    return not damaged


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from recsys_dagster.publishing.protocol import status

    end = args.end or _yesterday()
    start = args.start or end - dt.timedelta(days=max(args.days, 1) - 1)
    if end < start:
        raise UsageError(f"--end {end} is before --start {start}")
    pull_trees(settings.lake_root)  # the partitions' records, from the bucket when it is the system of record
    manifests = status(settings.artifact_root)
    if args.json:
        rows = partition_rows(settings, start, end)
        print(json.dumps({"manifests": manifests, "partitions": rows}, indent=2))
        return EXIT_FAILED if any(row.get("errors") for row in rows) else EXIT_OK
    print(f"RECSYS_HOME {settings.home}")
    if settings.storage_url:
        print(f"storage {settings.storage_url} (RECSYS_HOME holds a cache of it)")
    if settings.tuned_file is not None:
        print(f"tuned parameters in use: {settings.tuned_file}")
    print()
    print("Published manifests")
    if not manifests:
        print("  none yet (run the pipeline through published_manifest)")
    for entry in manifests:
        label = f"{entry['tenant']}/{entry['surface']}"
        if entry.get("error"):
            print(f"  {label}: ERROR {entry['error']}")
            continue
        if not entry.get("manifest_version"):
            print(f"  {label}: nothing published")
            _print_refusal(entry)
            continue
        print(
            f"  {label}: manifest {entry['manifest_version'][:12]}  as of {entry['as_of']}  "
            f"updated {entry['updated_at']} ({_age(entry['age_seconds'])} ago)"
        )
        for kind, artifact in sorted(entry["artifacts"].items()):
            rows = artifact.get("rows")
            print(
                f"    {kind:<13} {artifact['version'][:12]}  {rows:>10,} rows"
                if rows is not None
                else f"    {kind}"
            )
        evaluation = entry.get("evaluation")
        if evaluation:
            figures = ", ".join(
                f"{metric} " + ", ".join(f"{model} {value:.4f}" for model, value in values.items())
                for metric, values in evaluation.items()
                if isinstance(values, dict)
            )
            verdict = "passed" if evaluation.get("passed") else "not passed"
            print(
                f"    evaluation    {verdict}; {figures}"
                + (f" ({evaluation['note']})" if evaluation.get("note") else "")
            )
        if entry.get("blend"):
            print("    blend         " + ", ".join(f"{source} {w:g}" for source, w in entry["blend"].items()))
        _print_refusal(entry)
    print()
    print("Canonical partitions")
    return EXIT_OK if _print_partition_table(settings, start, end) else EXIT_FAILED


def _print_refusal(entry: dict) -> None:
    """The newest refused publish of a target, when nothing was published or rolled back since."""
    refused = entry.get("refused")
    if refused:
        print(f"    NOT PUBLISHED: as of {refused['as_of']} at {refused['at']}: {refused['reason']}")


def _age(seconds: int | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def cmd_history(args: argparse.Namespace, settings: Settings) -> int:
    from recsys_core.manifest import ManifestError
    from recsys_core.names import UnsafePathError
    from recsys_dagster.publishing.protocol import history

    try:
        records = history(settings.artifact_root, args.tenant, args.surface)
    except (UnsafePathError, ManifestError) as exc:
        raise UsageError(str(exc)) from exc
    shown = records[-args.limit :] if args.limit > 0 else records
    if args.json:
        print(json.dumps({"tenant": args.tenant, "surface": args.surface, "records": shown}, indent=2))
        return EXIT_OK
    if not records:
        print(f"{args.tenant}/{args.surface}: no registry records")
        return EXIT_OK
    print(f"{'seq':>4}  {'at':<20}  {'action':<12}  {'manifest':<12}  {'as_of':<10}  detail")
    for record in shown:
        detail = record.get("reason") or record.get("message") or ""
        if record.get("actor") and record["action"] == "rollback":
            detail = f"by {record['actor']}: {detail}"
        print(
            f"{record.get('seq', ''):>4}  {record.get('at', ''):<20}  {record.get('action', ''):<12}  "
            f"{(record.get('manifest_version') or '')[:12]:<12}  {record.get('as_of') or '':<10}  {detail}"
        )
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace, settings: Settings) -> int:
    import getpass

    from recsys_core.manifest import ManifestError
    from recsys_core.names import UnsafePathError
    from recsys_dagster.publishing.protocol import PublishError, history, rollback

    if args.steps is not None and args.steps < 1:
        raise UsageError("--steps must be >= 1")
    to_version = args.to_version
    try:
        if to_version and len(to_version) < 64:
            known = {
                r.get("manifest_version") for r in history(settings.artifact_root, args.tenant, args.surface)
            }
            matches = sorted(v for v in known if v and v.startswith(to_version))
            if len(matches) != 1:
                raise UsageError(
                    f"--to {to_version!r} matches {len(matches)} published manifest(s); give more characters"
                )
            to_version = matches[0]
        outcome = rollback(
            settings.artifact_root,
            args.tenant,
            args.surface,
            to_version=to_version,
            steps=args.steps,
            reason=args.reason,
            actor=os.environ.get("RECSYS_ACTOR") or getpass.getuser(),
        )
    except UnsafePathError as exc:  # a tenant or surface name that is not a safe path segment
        raise UsageError(str(exc)) from exc
    except (PublishError, ManifestError) as exc:
        print(f"recsys rollback: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{args.tenant}/{args.surface}: {outcome.message}")
    return EXIT_OK


def cmd_gc(args: argparse.Namespace, settings: Settings) -> int:
    from recsys_dagster.publishing.gc import gc

    if args.keep < 1:
        raise UsageError("--keep must be >= 1 (the current manifest is always kept)")
    report = gc(
        settings.artifact_root, args.keep, apply=args.apply, min_age_seconds=int(args.min_age_hours * 3600)
    )
    listed = report.deleted if args.apply else report.to_delete
    verb = "deleted" if args.apply else "would delete"
    for path, size in listed:
        print(f"{verb} {path} ({size / 1e6:.1f} MB)")
    total = sum(size for _, size in listed)
    print(f"{verb} {len(listed)} artifact version(s), {total / 1e6:.1f} MB; kept {report.kept}")
    if not args.apply and listed:
        print("dry run: add --apply to delete")
    for error in report.errors:
        print(f"error: {error}", file=sys.stderr)
    return EXIT_FAILED if report.errors else EXIT_OK


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from recsys_serving.server import serve

    workers = settings.serve_workers if args.workers is None else args.workers
    if not 1 <= workers <= MAX_SERVE_WORKERS:
        raise UsageError(f"--workers must be 1-{MAX_SERVE_WORKERS}, got {workers}")
    if not 0 < args.port < 65536:
        raise UsageError("--port must be 1-65535")
    _check_port(args.host, args.port)
    base = f"http://{args.host}:{args.port}"
    print(f"recsys API on {base} (docs: {base}/docs), serving manifests under {settings.artifact_root}")
    for line in example_requests(settings, base):
        print(f"  {line}")
    serve(args.host, args.port, workers, settings=settings)
    return EXIT_OK


def example_requests(settings: Settings, base: str) -> list[str]:
    """curl calls that work against what is published now (a real user and item of the first target)."""
    from recsys_core.manifest import ManifestError, list_targets, read_current

    for tenant, surface in list_targets(settings.artifact_root):
        try:
            manifest = read_current(settings.artifact_root, tenant, surface)
        except (ManifestError, OSError):
            continue
        if manifest is None:
            continue
        query = f"tenant={tenant}&surface={surface}"
        user = _first_value(settings, manifest, "user_history", "user_id")
        # An item with co-occurrence neighbours, so that the example returns items.
        item = _first_value(settings, manifest, "cooc", "item_id")
        lines = [f"curl '{base}/v1/popular?{query}&k=5'"]
        if user:
            lines.append(f"curl '{base}/v1/recommendations?{query}&user_id={user}&k=5'")
        if item:
            lines.append(f"curl '{base}/v1/items/{item}/similar?{query}&k=5'")
        else:
            lines.append(
                f"# no /v1/items/{{item_id}}/similar example: the cooc artifact has no pairs yet (more data, or "
                f"a lower artifacts.cooc.min_support, now {settings.pipeline.artifacts.cooc.min_support})"
            )
        return [*lines, f"curl '{base}/v1/manifest?{query}'", f"curl '{base}/readyz'"]
    return [f"curl '{base}/readyz'   # nothing is published yet: run the pipeline first"]


def _first_value(settings: Settings, manifest: Manifest, kind: str, column: str) -> str | None:
    import pyarrow.parquet as pq

    from recsys_core.kinds import ARTIFACT_KINDS
    from recsys_core.manifest import resolve_uri

    uri = manifest["current"].get(kind)
    if uri is None:
        return None
    folder = resolve_uri(settings.artifact_root, manifest["tenant"], manifest["surface"], uri)
    data = pq.ParquetFile(folder / ARTIFACT_KINDS[kind].table)
    if not data.metadata.num_rows:
        return None
    return data.read_row_group(0, columns=[column]).column(0)[0].as_py()


def _check_port(host: str, port: int) -> None:
    """Refuse a port that another process listens on now, before loading or starting anything."""
    problem = port_problem(host, port)
    if problem is not None:
        raise UsageError(f"{problem}; stop what uses it, or choose another with --port")


def cmd_ui(args: argparse.Namespace, settings: Settings) -> int:
    from recsys_dagster.runner import prepare_instance

    if not 0 < args.port < 65536:
        raise UsageError("--port must be 1-65535")
    _check_port(args.host, args.port)
    prepare_instance(settings)
    workspace = Path(__file__).resolve().parent.parent / "workspace.yaml"
    print(
        f"Dagster UI on http://{args.host}:{args.port} (DAGSTER_HOME={settings.dagster_home}); Ctrl-C stops it"
    )
    command = [
        sys.executable,
        # `dagster dev` warns on every start that `dg dev` supersedes it. The notice is for developers
        # moving a project to the `dg` tooling; this command runs `dagster dev` on the repository's
        # workspace file on purpose, so the notice is left out (this process only).
        "-W",
        "ignore:Function `dev_command` is superseded",
        "-m",
        "dagster",
        "dev",
        "-w",
        str(workspace),
        "-h",
        args.host,
        "-p",
        str(args.port),
    ]
    # Replace this process so that Ctrl-C and SIGTERM reach dagster directly. Started in the background by a
    # script, this process inherits an ignored SIGINT, which would survive the exec and make dagster dev
    # ignore SIGINT and SIGTERM alike (and leave its children running): restore the default first.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.execv(sys.executable, command)
    return EXIT_OK


def cmd_sql(args: argparse.Namespace, settings: Settings) -> int:
    from recsys_dagster.transform.sql import paste_script, sql_path

    try:
        sql_path(args.model)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    print(paste_script(args.model, _sql_params(args, settings)), end="")
    return EXIT_OK


def _sql_params(args: argparse.Namespace, settings: Settings) -> dict:
    """The parameters the pipeline runs `args.model` with for the day asked (default: yesterday).

    Only the ones the file reads are printed, so the canonical checks share one set.
    """
    import dataclasses

    from recsys_core.kinds import ARTIFACT_KINDS
    from recsys_core.lake import parquet_files, partition_dir, read_summary
    from recsys_dagster.ingest.gates import SAMPLE_ROWS, arrival_window, exposure_log_files
    from recsys_dagster.transform.aggregates import DAILY_MODELS, daily_aggregate_params
    from recsys_dagster.transform.artifacts import window_inputs

    config, lake_root, model = (
        settings.pipeline,
        (args.lake_root or settings.lake_root).absolute(),
        args.model,
    )
    kind = next((k for k in ARTIFACT_KINDS.values() if k.sql_model == model), None)
    if kind is not None:
        if args.day:
            raise UsageError(f"{model} is built over a window: give --as-of, not --day")
        try:
            params, _, _ = window_inputs(kind.name, lake_root, args.as_of or _yesterday(), config)
        except FileNotFoundError as exc:
            raise UsageError(str(exc)) from None
        return params
    if model not in DAILY_MODELS and not model.startswith("checks/canonical_"):
        raise UsageError(f"{model} checks one artifact file, not a partition: set its variables by hand")
    if args.as_of:
        raise UsageError(f"{model} reads one canonical_events partition: give --day, not --as-of")
    day = args.day or _yesterday()
    folder = partition_dir(lake_root, "canonical_events", day)
    paths = [str(path) for path in parquet_files(folder)]
    if not paths:
        raise UsageError(f"canonical_events partition {day} has not been materialized ({folder})")
    if model in DAILY_MODELS:
        return {"paths": paths} | daily_aggregate_params(model, config)
    # run_gates' arrival window and exposure log files; the limits are the checks settings of those names.
    start, end = arrival_window(day, config.ingest)
    window = {"window_start": start.isoformat(), "window_end": end.isoformat()}
    summary = read_summary(lake_root, day)
    exposures = exposure_log_files(summary) if summary else []
    return (
        {"paths": paths, "max_rows": SAMPLE_ROWS, "exposure_files": exposures}
        | window
        | dataclasses.asdict(config.checks)
    )


def cmd_rules(args: argparse.Namespace, settings: Settings) -> int:
    """`recsys rules validate|publish|show` (docs/reference/rules.md)."""
    import getpass

    from recsys_core.manifest import ManifestError, read_current
    from recsys_core.names import UnsafePathError
    from recsys_core.rules import RulesError, read_rules, rules_in_force
    from recsys_dagster.publishing.protocol import PublishError
    from recsys_dagster.publishing.rules import publish_rules

    if args.rules_command == "publish" and not args.dry_run and args.json:
        raise UsageError("--json goes with --dry-run")
    try:
        if args.rules_command == "show":
            current = read_current(settings.artifact_root, args.tenant, args.surface)
            in_force = current and rules_in_force(settings.artifact_root, current)
            if not in_force:
                print(f"{args.tenant}/{args.surface}: no rules in force")
                return EXIT_OK
            print(in_force[1].normalised_json().decode(), end="")
            return EXIT_OK
        document = read_rules(args.file)
        counts = Counter(rule.action for rule in document.rules)
        summary = ", ".join(f"{n} {action}" for action, n in sorted(counts.items())) or "no rules"
        if args.rules_command == "validate":
            print(f"{args.file}: valid ({summary})")
            return EXIT_OK
        if args.dry_run:
            return _rules_dry_run(args, settings, document)
        outcome = publish_rules(
            settings.artifact_root,
            args.tenant,
            args.surface,
            document,
            reason=args.reason,
            actor=os.environ.get("RECSYS_ACTOR") or getpass.getuser(),
        )
    except UnsafePathError as exc:
        raise UsageError(str(exc)) from exc
    except (RulesError, PublishError, ManifestError) as exc:
        print(f"recsys rules {args.rules_command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{args.tenant}/{args.surface}: rules {summary}: {outcome.message}")
    return EXIT_OK if outcome.action in ("publish", "noop") else EXIT_FAILED


def _rules_dry_run(args: argparse.Namespace, settings: Settings, document: RulesDocument) -> int:
    """`recsys rules publish --dry-run`: the report of recsys_serving.rules_dry_run, nothing published."""
    from recsys_core.manifest import read_current
    from recsys_core.rules import DRY_RUN_MAX_SAMPLE, DRY_RUN_SAMPLE
    from recsys_serving.rules_dry_run import dry_run
    from recsys_serving.store import LoadError, load_target

    sample = DRY_RUN_SAMPLE if args.sample is None else args.sample
    if not 1 <= sample <= DRY_RUN_MAX_SAMPLE:
        raise UsageError(f"--sample must be from 1 to {DRY_RUN_MAX_SAMPLE}, got {sample}")
    current = read_current(settings.artifact_root, args.tenant, args.surface)
    if current is None:
        print(
            f"recsys rules publish: {args.tenant}/{args.surface}: nothing is published yet; run the pipeline "
            "first",
            file=sys.stderr,
        )
        return EXIT_FAILED
    try:
        target = load_target(settings.artifact_root, args.tenant, args.surface, current)
    except LoadError as exc:
        print(f"recsys rules publish: the current manifest cannot be loaded: {exc}", file=sys.stderr)
        return EXIT_FAILED
    report = dry_run(settings, target, document, sample=sample, at=args.at)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, ensure_ascii=False))
        return EXIT_OK
    source = {"decisions": "the newest landed decision traces", "user_history": "users with history"}
    print(
        f"{report.tenant}/{report.surface}: dry run of {args.file} (nothing published) on {report.requests} "
        f"requests from {source[report.source]}, rules evaluated at {report.as_dict()['at']}"
    )
    print(
        f"requests affected: {report.affected} of {report.requests} ({report.reordered} only reordered); "
        f"items added {report.items_added} ({report.filled} only filling the list), removed "
        f"{report.items_removed} ({report.displaced} only pushed out by items placed above them)"
    )
    header = f"{'rule':<24}  {'action':<7}  {'change':<9}  {'requests now':>12}  {'requests new':>12}  {'added':>6}  {'removed':>7}"
    print(header)
    print("-" * len(header))
    for effect in report.rules:
        print(
            f"{effect.rule_id:<24}  {effect.action:<7}  {effect.change:<9}  {effect.requests_current:>12}  "
            f"{effect.requests_new:>12}  {effect.items_added:>6}  {effect.items_removed:>7}"
        )
    for example in report.examples:
        who = f"user {example['user_id']}" if example["user_id"] else "no user"
        request = f"request {example['request_id']} ({who})" if example["request_id"] else who
        changes = [f"+{item}" for item in example["added"]] + [f"-{item}" for item in example["removed"]]
        print(f"  {request}: {' '.join(changes) or 'reordered'}")
    return EXIT_OK


def cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    """`recsys audit`: landed decision traces as JSON lines, newest first (docs/reference/decisions.md)."""
    from recsys_core.decisions import find_decisions, trace_line

    if args.limit < 1:
        raise UsageError("--limit must be >= 1")
    if args.request_id and (args.since or args.until):
        raise UsageError("--since and --until go with --user-id")

    def midnight(day: dt.date | None) -> dt.datetime | None:
        return None if day is None else dt.datetime.combine(day, dt.time(), dt.UTC)

    traces = find_decisions(
        settings.lake_root,
        args.tenant,
        args.surface,
        request_id=args.request_id,
        user_id=args.user_id,
        since=midnight(args.since),
        until=midnight(args.until + dt.timedelta(days=1) if args.until else None),
        limit=args.limit,
    )
    for trace in traces:
        sys.stdout.write(trace_line(trace).decode())
    if not traces:
        print(
            f"recsys audit: no landed trace of {args.tenant}/{args.surface} matches; traces are landed by the "
            "daily run's decisions asset",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
