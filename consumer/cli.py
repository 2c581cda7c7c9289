"""`llm-consumer run | check-config | schemas | publish | tail | fake-llm`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from consumer import __version__
from consumer.config import ConfigError, Settings, load_settings
from consumer.enrich.template import PromptTemplate
from consumer.fake_llm import cli as fake_llm_cli


def _load(path: Path) -> Settings:
    settings = load_settings(path)
    PromptTemplate(settings.llm)  # a template or lookup that cannot load is a config error too
    return settings


def _cmd_run(args: argparse.Namespace) -> int:
    from consumer.app import run_app
    from consumer.observability.logs import configure_logging

    settings = _load(args.config)
    configure_logging(settings.logging.level, settings.logging.format)
    return asyncio.run(run_app(settings))


def _cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    llm = settings.llm
    print(f"{args.config}: OK")
    print(f"  input {settings.kafka.input_topic} -> output {settings.kafka.output_topic}")
    print(f"  dead letters -> {settings.kafka.dead_letter_topic}; group {settings.kafka.group_id}")
    print(f"  provider {llm.provider}, model {llm.model_name}, response field {llm.response_field}")
    print(
        f"  window: {settings.window.max_messages} rows or {settings.window.max_wait_ms} ms; "
        f"concurrency {llm.concurrency.initial} (min {llm.concurrency.min}, "
        f"max {llm.concurrency.max})"
    )
    return 0


def _cmd_schemas(args: argparse.Namespace) -> int:
    from consumer.schemas import write_schemas

    for path in write_schemas(args.out):
        print(path)
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    from consumer.topics import publish

    count = asyncio.run(
        publish(
            args.bootstrap_servers,
            args.topic,
            args.file,
            key_field=args.key_field,
            partitions=args.partitions,
            progress=not args.quiet and sys.stderr.isatty(),
        )
    )
    print(f"published {count} rows to {args.topic}", file=sys.stderr)
    return 0


def _cmd_tail(args: argparse.Namespace) -> int:
    from consumer.topics import tail

    count = asyncio.run(
        tail(
            args.bootstrap_servers,
            args.topic,
            follow=args.follow,
            output_format=args.format,
            response_field=args.response_field,
            limit=args.limit,
            expect=args.expect,
            timeout_s=args.timeout,
        )
    )
    print(f"{count} messages", file=sys.stderr)
    return 1 if args.expect is not None and count < args.expect else 0


def _cmd_fake_llm(args: argparse.Namespace) -> int:
    from consumer.fake_llm.server import run

    run(fake_llm_cli.config_from_args(args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-consumer",
        description="Enrich JSON rows on a Kafka topic with LLM calls, window by window.",
    )
    parser.add_argument("--version", action="version", version=f"llm-consumer {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="consume, enrich, produce, commit")
    run.add_argument("-c", "--config", type=Path, required=True, help="settings YAML file")
    run.set_defaults(handler=_cmd_run)

    check = commands.add_parser("check-config", help="validate a settings file and exit")
    check.add_argument("config", type=Path)
    check.set_defaults(handler=_cmd_check_config)

    schemas = commands.add_parser("schemas", help="write the JSON Schemas into a folder")
    schemas.add_argument("--out", type=Path, default=Path("schemas"))
    schemas.set_defaults(handler=_cmd_schemas)

    bootstrap = {"default": "127.0.0.1:19092", "help": "Kafka bootstrap servers"}
    publish = commands.add_parser("publish", help="publish a JSONL or CSV file to a topic")
    publish.add_argument("file", type=Path)
    publish.add_argument("-t", "--topic", required=True)
    publish.add_argument("-b", "--bootstrap-servers", **bootstrap)  # type: ignore[arg-type]
    publish.add_argument("-k", "--key-field", help="row field used as the message key")
    publish.add_argument("-p", "--partitions", type=int, help="create the topic with N partitions")
    publish.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    publish.set_defaults(handler=_cmd_publish)

    tail = commands.add_parser("tail", help="print an output topic")
    tail.add_argument("-t", "--topic", required=True)
    tail.add_argument("-b", "--bootstrap-servers", **bootstrap)  # type: ignore[arg-type]
    tail.add_argument("-f", "--follow", action="store_true", help="keep waiting for more")
    tail.add_argument("--format", choices=("table", "jsonl"), default="table")
    tail.add_argument("--response-field", default="llm_response")
    tail.add_argument("-n", "--limit", type=int, help="stop after N messages")
    tail.add_argument(
        "--expect", type=int, help="wait until N messages arrived (exit 1 if they do not)"
    )
    tail.add_argument("--timeout", type=float, help="give up after this many seconds")
    tail.set_defaults(handler=_cmd_tail)

    fake = commands.add_parser("fake-llm", help="run the OpenAI-compatible fake LLM server")
    fake_llm_cli.add_arguments(fake)
    fake.set_defaults(handler=_cmd_fake_llm)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


__all__ = ["build_parser", "main"]
