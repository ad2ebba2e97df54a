"""The ceiling: a FastStream consume-then-publish pipe with no database, as its own process.

It consumes the same input topics the way the service does (one subscriber per
topic, one consumer group, ``AckPolicy.NACK_ON_ERROR`` so offsets are committed
after the handler returned, the same group timeouts, and the service's batch
size when it consumes in batches) and publishes every record to one output
topic, keyed like the input, acknowledged by the broker (``acks="all"``) before
the offset is committed: one message at a time, or a batch's outputs pipelined.
The output is the input padded with whitespace to ``--output-bytes`` (still
valid JSON), the size of the events the service writes. Whatever the service
does beyond this (decoding, rules, PostgreSQL, the outbox) is what the
benchmark's throughput ratio measures.

    python -m bench.ceiling --bootstrap 127.0.0.1:9092 --group g --output out \
        --output-bytes 1800 in-1 in-2 ...

Prints ``ready`` once every subscriber has started and ``first-consumed <epoch s>``
at its first message (the start of the measured drain); SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from typing import Any

from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage

from service.entrypoints.subscribers import broker_security
from service.settings import Settings


async def serve(args: argparse.Namespace) -> None:
    settings = Settings(kafka_bootstrap_servers=args.bootstrap)
    broker = KafkaBroker(security=broker_security(settings), enable_idempotence=False,
                         acks="all", linger_ms=2, logger=None, bootstrap_servers=args.bootstrap,
                         graceful_timeout=10)
    size = args.output_bytes
    first = {"consumed": False}

    def note_first() -> None:
        if not first["consumed"]:
            first["consumed"] = True
            print(f"first-consumed {time.time():.6f}", flush=True)

    def pad(value: bytes | None) -> bytes:
        value = value or b""
        return value + b" " * (size - len(value)) if len(value) < size else value

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    # like the service (entrypoints/subscribers.py): the broker first, then the subscribers
    await broker.start()
    try:
        subscribers = []
        for topic in args.inputs:
            options: dict[str, Any] = {}
            if args.batch_max_records > 0:
                options = {"batch": True, "max_records": args.batch_max_records,
                           "batch_timeout_ms": args.batch_timeout_ms}
            subscriber = broker.subscriber(
                topic, **options, group_id=args.group, auto_offset_reset="earliest",
                ack_policy=AckPolicy.NACK_ON_ERROR, max_poll_interval_ms=600_000,
                session_timeout_ms=args.session_timeout_ms,
                heartbeat_interval_ms=args.heartbeat_interval_ms, persistent=False,
            )
            if args.batch_max_records > 0:
                @subscriber  # type: ignore[untyped-decorator,unused-ignore]
                async def pipe_batch(message: KafkaMessage) -> None:
                    note_first()
                    records: Any = message.raw_message
                    futures = [await broker.publish(pad(record.value), args.output,
                                                    key=record.key, no_confirm=True)
                               for record in records]
                    await asyncio.gather(*futures)  # every output acknowledged, then commit
            else:
                @subscriber  # type: ignore[untyped-decorator,unused-ignore]
                async def pipe(message: KafkaMessage) -> None:
                    note_first()
                    record: Any = message.raw_message
                    await broker.publish(pad(record.value), args.output, key=record.key)
            subscribers.append(subscriber)
        await asyncio.gather(*(subscriber.start() for subscriber in subscribers))
        print("ready", flush=True)
        await stopping.wait()
    finally:
        await broker.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="input topics")
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--output", required=True, help="output topic")
    parser.add_argument("--output-bytes", type=int, default=0,
                        help="pad each output to this many bytes")
    parser.add_argument("--session-timeout-ms", type=int, default=10_000)
    parser.add_argument("--heartbeat-interval-ms", type=int, default=3_000)
    parser.add_argument("--batch-max-records", type=int, default=0,
                        help="consume in batches of up to this many (0: one message at a time)")
    parser.add_argument("--batch-timeout-ms", type=int, default=20)
    asyncio.run(serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
