"""`llm-consumer run | check-config | schemas | publish | estimate | tail | replay | offsets |
cache | batches | fake-llm`.

Every command that touches Kafka takes `-c settings.yaml`, the file `run` uses, so `publish`
and `tail` find the same broker, topics and response field without repeating them; flags
override it. Exit codes: 0 done, 1 a runtime failure (broker unreachable, a sample row that
does not render), 2 something given cannot be used (settings, flags, an input file).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from consumer import __version__, batchcli, cachecli
from consumer.config import ConfigError, Settings, load_settings
from consumer.csvrows import COLUMN_TYPES, ColumnType, CsvTypes, RowFileError, parse_csv_types
from consumer.enrich.template import PromptTemplate
from consumer.fake_llm import cli as fake_llm_cli

if TYPE_CHECKING:
    from consumer.topics import Broker

DEFAULT_BOOTSTRAP = "127.0.0.1:19092"

# Help for the fake LLM's flags that `consumer.fake_llm.cli` registers without any, so that
# `llm-consumer fake-llm --help` documents every flag like the other commands.
_FAKE_LLM_HELP = {
    "host": "address to listen on",
    "answer": "sentiment: classify the last user message; echo: repeat it (longer answers)",
    "latency_ms": "latency of every answer",
    "latency_per_inflight_ms": "added per request in flight at admission (a vLLM-like knee)",
    "overload": "beyond capacity: answer 429 at once (reject) or wait in line (queue, as vLLM)",
    "rate_429": "share of requests answered 429 at random (seeded)",
    "rate_500": "share of requests answered 500 at random (seeded)",
    "rate_503": "share of requests answered 503 at random (seeded)",
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows `(default: X)` where a default means something; None and False mean "not set"."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _usage_error(args: argparse.Namespace, message: str) -> NoReturn:
    """Usage, the message and exit 2, as argparse does for its own checks."""
    parser: argparse.ArgumentParser = args.parser
    parser.error(message)


def _load(path: Path) -> tuple[Settings, PromptTemplate]:
    settings = load_settings(path)
    # A template or lookup that cannot load is a configuration error too.
    return settings, PromptTemplate(settings.llm)


def _cmd_run(args: argparse.Namespace) -> int:
    from consumer.app import run_app
    from consumer.observability.logs import configure_logging

    settings, _ = _load(args.config)
    logs = settings.logging
    level = args.log_level or logs.level
    if args.progress and args.log_level is None and sys.stderr.isatty():
        level = "WARNING"  # the live line, not a log line per window, unless asked for
    configure_logging(
        level, args.log_format or logs.format, logs.library_level, logs.library_repeat_s
    )
    return asyncio.run(run_app(settings, progress=args.progress))


def _check_config_path(args: argparse.Namespace) -> Path:
    """`check-config settings.yaml` (the old form) and `check-config -c settings.yaml`."""
    if args.settings_file and args.config and args.settings_file != args.config:
        _usage_error(args, f"two settings files given: {args.settings_file} and -c {args.config}")
    path: Path | None = args.config or args.settings_file
    if path is None:
        _usage_error(args, "give the settings file: check-config -c settings.yaml")
    return path


def _cmd_check_config(args: argparse.Namespace) -> int:
    from consumer.decode import RowLimits
    from consumer.sample import render_sample

    path = _check_config_path(args)
    if args.rows < 0:
        _usage_error(args, f"--rows takes 0 (every row) or more, got {args.rows}")
    settings, template = _load(path)
    llm = settings.llm
    print(f"{path}: OK")
    print(f"  input {settings.kafka.input_topic} -> output {settings.kafka.output_topic}")
    print(f"  dead letters -> {settings.kafka.dead_letter_topic}; group {settings.kafka.group_id}")
    print(f"  provider {llm.provider}, model {llm.model_name}, response field {llm.response_field}")
    print(
        f"  window: {settings.window.max_messages} rows or {settings.window.max_wait_ms} ms; "
        f"concurrency {llm.concurrency.initial} (min {llm.concurrency.min}, "
        f"max {llm.concurrency.max})"
    )
    if args.sample is None:
        return 0
    limits = RowLimits.from_settings(settings.kafka)
    failed = render_sample(template, args.sample, args.rows, limits, _csv_types(args))
    return 1 if failed else 0


def _cmd_schemas(args: argparse.Namespace) -> int:
    from consumer.schemas import write_schemas

    for path in write_schemas(args.out):
        print(path)
    return 0


def _csv_types(args: argparse.Namespace) -> CsvTypes:
    default: ColumnType = "str" if args.csv_strings else "auto"
    return CsvTypes(default, args.csv_types or {})


def _settings_for_topics(args: argparse.Namespace) -> Settings | None:
    """With -c, the settings file (not its template: publish and tail never render one)."""
    return load_settings(args.config) if args.config else None


def _broker(args: argparse.Namespace, settings: Settings | None) -> Broker:
    """The flag, else the settings file's kafka section (with its SASL/SSL options), else
    KAFKA_BOOTSTRAP_SERVERS, else the local broker of the demo."""
    from consumer.kafka.clients import connection_options
    from consumer.topics import Broker

    if settings is not None:
        options = connection_options(settings.kafka)
        source = f"kafka.bootstrap_servers in {args.config}"
    else:
        environ = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        options = {"bootstrap_servers": environ or DEFAULT_BOOTSTRAP}
        source = "KAFKA_BOOTSTRAP_SERVERS" if environ else "the default"
    if args.bootstrap_servers:
        options["bootstrap_servers"] = args.bootstrap_servers
        source = "-b"
    return Broker(options, source, args.connect_timeout)


def _cmd_publish(args: argparse.Namespace) -> int:
    from consumer.observability.logs import configure_cli_logging
    from consumer.topics import publish

    settings = _settings_for_topics(args)
    topic = args.topic or (settings.kafka.input_topic if settings else None)
    if topic is None:
        _usage_error(args, "give the topic: -t TOPIC, or -c settings.yaml for its input topic")
    configure_cli_logging()
    count = asyncio.run(
        publish(
            _broker(args, settings),
            topic,
            args.file,
            key_field=args.key_field,
            partitions=args.partitions,
            progress=not args.quiet and sys.stderr.isatty(),
            csv_types=_csv_types(args),
        )
    )
    print(f"published {count} rows to {topic}", file=sys.stderr)
    return 0


def _cmd_estimate(args: argparse.Namespace) -> int:
    """A dry run: render every row, estimate tokens and cost; no broker, no provider."""
    import orjson

    from consumer.estimate import estimate

    settings = load_settings(args.config)
    result = estimate(
        settings,
        args.file,
        output_tokens=args.output_tokens,
        csv_types=_csv_types(args),
        progress=not args.quiet and sys.stderr.isatty(),
    )
    if args.json:
        print(orjson.dumps(result.as_dict()).decode())
    else:
        print(result.text())
    return 0


def _cmd_tail(args: argparse.Namespace) -> int:
    from consumer.observability.logs import configure_cli_logging
    from consumer.topics import tail

    settings = _settings_for_topics(args)
    if args.dlq and settings is None:
        _usage_error(args, "--dlq reads the dead-letter topic of a settings file: add -c FILE")
    topic: str | None = args.topic
    if settings is not None and topic is None:
        kafka = settings.kafka
        topic = kafka.dead_letter_topic if args.dlq else kafka.output_topic
    if topic is None:
        _usage_error(args, "give the topic: -t TOPIC, or -c settings.yaml for its output topic")
    response_field = args.response_field or (
        settings.llm.response_field if settings else "llm_response"
    )
    dead_letters = args.dlq or topic.endswith(".dlq")
    if settings is not None:
        dead_letters = dead_letters or topic == settings.kafka.dead_letter_topic
    configure_cli_logging()
    count = asyncio.run(
        tail(
            _broker(args, settings),
            topic,
            follow=args.follow,
            output_format=args.format,
            response_field=response_field,
            limit=args.limit,
            expect=args.expect,
            timeout_s=args.timeout,
            dead_letters=dead_letters,
        )
    )
    print(f"{count} messages", file=sys.stderr)
    return 1 if args.expect is not None and count < args.expect else 0


def _cmd_cache(args: argparse.Namespace) -> int:
    return cachecli.run(args)


def _cmd_replay(args: argparse.Namespace) -> int:
    from consumer import offsetscli
    from consumer.observability.logs import configure_cli_logging

    settings = _settings_for_topics(args)
    if settings is None:
        _usage_error(args, "replay reads the output or dead-letter topic of -c settings.yaml")
    if args.template_hash and args.what != "errors":
        _usage_error(args, "--template-hash selects error rows: replay errors --template-hash H")
    configure_cli_logging()
    return asyncio.run(offsetscli.replay(args, settings, _broker(args, settings)))


def _cmd_offsets(args: argparse.Namespace) -> int:
    from consumer import offsetscli
    from consumer.observability.logs import configure_cli_logging

    settings = _settings_for_topics(args)
    if settings is None and not (args.group and args.topic):
        _usage_error(args, "give -c settings.yaml, or --group GROUP and -t TOPIC")
    if args.reset is not None:
        try:
            offsetscli.reset_target(args.reset)
        except argparse.ArgumentTypeError as error:
            _usage_error(args, str(error))
    configure_cli_logging()
    return asyncio.run(offsetscli.offsets(args, settings, _broker(args, settings)))


def _cmd_fake_llm(args: argparse.Namespace) -> int:
    from consumer.fake_llm.server import run

    run(fake_llm_cli.config_from_args(args))
    return 0


def _csv_types_argument(text: str) -> dict[str, ColumnType]:
    try:
        return parse_csv_types(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_csv_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--csv-strings",
        action="store_true",
        help="keep every CSV field a string (by default numbers, true/false and empty "
        "fields become numbers, booleans and null)",
    )
    parser.add_argument(
        "--csv-types",
        type=_csv_types_argument,
        metavar="COL=TYPE,...",
        help=f"the type of named CSV columns, one of {', '.join(COLUMN_TYPES)}; "
        "e.g. zip=str,priority=int,tags=json",
    )


def _add_kafka_options(parser: argparse.ArgumentParser, topic_help: str) -> None:
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        metavar="FILE",
        help="settings file: its broker (with SASL/SSL), topics and response field",
    )
    parser.add_argument("-t", "--topic", help=topic_help)
    parser.add_argument(
        "-b",
        "--bootstrap-servers",
        help=f"Kafka bootstrap servers (default: kafka.bootstrap_servers of -c, else "
        f"$KAFKA_BOOTSTRAP_SERVERS, else {DEFAULT_BOOTSTRAP})",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="keep trying to reach the broker this long, then exit 1",
    )


def offsetscli_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    """The flags of `replay` and `offsets` (imported here: aiokafka costs `--help` time)."""
    from consumer import offsetscli

    if command == "replay":
        offsetscli.add_replay_arguments(parser)
    else:
        offsetscli.add_offsets_arguments(parser)


def _subcommand(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], name: str, summary: str
) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        name, help=summary, description=summary, formatter_class=_HelpFormatter
    )
    parser.set_defaults(parser=parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-consumer",
        description="Enrich JSON rows on a Kafka topic with LLM calls, window by window.",
        epilog="Exit codes: 0 done, 1 runtime failure, 2 unusable settings, flags or input.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"llm-consumer {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = _subcommand(commands, "run", "consume, enrich, produce, commit")
    run.add_argument(
        "-c", "--config", type=Path, required=True, metavar="FILE", help="settings YAML file"
    )
    run.add_argument(
        "--log-level",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="the least level logged (default: logging.level of -c, INFO)",
    )
    run.add_argument(
        "--log-format",
        choices=("auto", "json", "text"),
        help="json lines, text, or auto: text on a terminal (default: logging.format of -c)",
    )
    run.add_argument(
        "--progress",
        action="store_true",
        help="a live line on stderr (rows/s, lag, limit, errors, tokens, cost when priced; "
        "on a terminal the log level is then WARNING unless --log-level) and a summary at exit",
    )
    run.set_defaults(handler=_cmd_run)

    check = _subcommand(
        commands, "check-config", "validate a settings file; render its template for sample rows"
    )
    check.add_argument(
        "settings_file",
        nargs="?",
        type=Path,
        metavar="SETTINGS",
        help="settings YAML file (the same as -c, kept for older scripts)",
    )
    check.add_argument("-c", "--config", type=Path, metavar="FILE", help="settings YAML file")
    check.add_argument(
        "--sample",
        type=Path,
        metavar="ROWS_FILE",
        help="a JSONL or CSV file: print the prompt for its first rows; exit 1 if any fails",
    )
    check.add_argument(
        "--rows", type=int, default=5, metavar="N", help="rows of --sample to render; 0: all"
    )
    _add_csv_options(check)
    check.set_defaults(handler=_cmd_check_config)

    schemas = _subcommand(commands, "schemas", "write the JSON Schemas into a folder")
    schemas.add_argument("--out", type=Path, default=Path("schemas"), help="folder to write")
    schemas.set_defaults(handler=_cmd_schemas)

    publish = _subcommand(commands, "publish", "publish a JSONL or CSV file to a topic")
    publish.add_argument("file", type=Path, help="rows: .jsonl (sent as is) or .csv (converted)")
    _add_kafka_options(publish, "topic to publish to (default: kafka.input_topic of -c)")
    publish.add_argument("-k", "--key-field", help="row field used as the message key")
    publish.add_argument(
        "-p", "--partitions", type=int, help="create the topic with N partitions if it is missing"
    )
    publish.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_csv_options(publish)
    publish.set_defaults(handler=_cmd_publish)

    cost = _subcommand(
        commands, "estimate", "dry run: the tokens and cost a JSONL or CSV file would take"
    )
    cost.add_argument(
        "-c", "--config", type=Path, required=True, metavar="FILE", help="settings YAML file"
    )
    cost.add_argument("file", type=Path, help="rows: .jsonl or .csv, as publish reads them")
    cost.add_argument(
        "--output-tokens",
        type=int,
        metavar="N",
        help="tokens per answer (default: half of llm.max_tokens)",
    )
    cost.add_argument("--json", action="store_true", help="one JSON object instead of text")
    cost.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_csv_options(cost)
    cost.set_defaults(handler=_cmd_estimate)

    tail = _subcommand(commands, "tail", "print a topic: outputs, or dead letters with reasons")
    _add_kafka_options(tail, "topic to read (default: kafka.output_topic of -c)")
    tail.add_argument("--dlq", action="store_true", help="read the dead-letter topic of -c instead")
    tail.add_argument("-f", "--follow", action="store_true", help="keep waiting for more")
    tail.add_argument(
        "--format",
        choices=("table", "jsonl"),
        default="table",
        help="table: one line per message; jsonl: partition, offset, key, headers and value",
    )
    tail.add_argument(
        "--response-field",
        help="the field the table shows (default: llm.response_field of -c, else llm_response)",
    )
    tail.add_argument("-n", "--limit", type=int, metavar="N", help="stop after N messages")
    tail.add_argument(
        "--expect",
        type=int,
        metavar="N",
        help="wait until N messages arrived (exit 1 if they do not)",
    )
    tail.add_argument("--timeout", type=float, metavar="SECONDS", help="give up after this long")
    tail.set_defaults(handler=_cmd_tail)

    cache = _subcommand(
        commands, "cache", "the response cache's Kafka table: stats, purge entries by age"
    )
    cachecli.add_arguments(cache, _subcommand)
    cache.set_defaults(handler=_cmd_cache)

    replay = _subcommand(
        commands, "replay", "publish error rows or dead letters again, to the input topic"
    )
    _add_kafka_options(replay, "topic to publish to (default: kafka.input_topic of -c)")
    offsetscli_arguments("replay", replay)
    replay.set_defaults(handler=_cmd_replay)

    group = _subcommand(
        commands, "offsets", "the group's committed offsets and lag; reset them (group stopped)"
    )
    _add_kafka_options(group, "the group's input topic (default: kafka.input_topic of -c)")
    offsetscli_arguments("offsets", group)
    group.set_defaults(handler=_cmd_offsets)

    jobs = _subcommand(commands, "batches", "list the batch jobs of a group from its state topic")
    batchcli.add_arguments(jobs)
    jobs.set_defaults(handler=batchcli.run)

    fake = _subcommand(commands, "fake-llm", "run the OpenAI-compatible fake LLM server")
    fake_llm_cli.add_arguments(fake)
    for action in fake._actions:
        if action.help is None and action.dest in _FAKE_LLM_HELP:
            action.help = _FAKE_LLM_HELP[action.dest]
    fake.set_defaults(handler=_cmd_fake_llm)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    except RowFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as error:
        # Imported here: aiokafka costs a tenth of a second that check-config need not pay.
        from aiokafka.errors import KafkaError

        from consumer.topics import BrokerUnreachable, TopicError

        if isinstance(error, (BrokerUnreachable, TopicError)):
            print(f"error: {error}", file=sys.stderr)
            return 1
        if isinstance(error, KafkaError):
            print(f"error: {args.command}: Kafka said {error}", file=sys.stderr)
            return 1
        raise


__all__ = ["build_parser", "main"]
