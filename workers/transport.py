"""The Redis transport a worker consumes with: kombu's, with its messages checked and their holders recorded.

Only the worker's consuming connection uses it (``use_guarded_transport``, called by the consumer in
``workers.app``); producers keep kombu's own transport. Differences from ``kombu.transport.redis``:

* ``GuardedChannel._brpop_read``: a list item that is not JSON is dead-lettered instead of raising after
  ``BRPOP`` already removed it (kombu would lose it and restart the consumer). Mirrors kombu 5.5–5.7's
  method except for that.
* ``GuardedChannel.basic_consume``: before kombu builds a message from an item, ``workers.guard`` checks
  its envelope (dead-lettered if kombu could not read it) and normalises it (a fresh delivery tag, the
  queue it came from).
* ``GuardedQoS``: a held message is also recorded in ``lookalike:holders`` under this process's heartbeat
  id, in the same MULTI as kombu's ``unacked`` entry, and forgotten in the same MULTI as it is acked,
  rejected or restored — what ``workers.recovery`` needs to restore a dead worker's messages in seconds.
"""

from __future__ import annotations

import logging
import time
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from workers import guard, recovery

log = logging.getLogger("workers.transport")


class GuardedQoS(kombu_redis.QoS):
    """kombu's Redis QoS, also keeping ``lookalike:holders`` (see the module docstring)."""

    def append(self, message: Any, delivery_tag: str) -> None:
        monitor = recovery.current()
        if monitor is None:  # nobody heartbeats for this process: leave it to the visibility timeout
            super().append(message, delivery_tag)
            return
        delivery = message.delivery_info
        exchange, routing_key = delivery["exchange"], delivery["routing_key"]
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()}) \
                .hset(self.unacked_key, delivery_tag, dumps([message._raw, exchange, routing_key])) \
                .hset(recovery.HOLDERS_KEY, delivery_tag, monitor.record(routing_key)) \
                .execute()
        virtual.QoS.append(self, message, delivery_tag)

    def _remove_from_indices(self, delivery_tag: str, pipe: Any = None) -> Any:
        return super()._remove_from_indices(delivery_tag, pipe).hdel(recovery.HOLDERS_KEY, delivery_tag)


class GuardedChannel(kombu_redis.Channel):
    QoS = GuardedQoS

    def basic_consume(self, queue: str, no_ack: bool, callback: Any, consumer_tag: str, **kwargs: Any) -> Any:
        result = super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)
        if not no_ack:  # task queues; the control (pidbox) queue is consumed without acks
            self.connection._callbacks[queue] = self._guarded(queue, callback)
        return result

    def _guarded(self, queue: str, callback: Any) -> Any:
        def on_item(raw: Any) -> Any:
            problem = guard.envelope_problem(raw)
            if problem is None:
                guard.normalise(raw, queue)
                try:
                    message = self.Message(raw, channel=self)
                except Exception as err:  # whatever else kombu cannot read
                    problem = f"kombu cannot read the message: {type(err).__name__}: {err}"
            if problem is not None:
                self._dead_letter(raw, problem, queue)
                return None
            self.qos.append(message, message.delivery_tag)
            return callback(message)

        return on_item

    def _dead_letter(self, raw: Any, reason: str, queue: str) -> None:
        from workers.deadletters import DeadLetters

        headers = raw.get("headers") if isinstance(raw, dict) else None
        try:
            with self.conn_or_acquire() as client:
                DeadLetters(client).add(raw, reason, attempts=1, id=guard.letter_key(headers, "raw"), queue=queue,
                                        task=guard.task_of(headers))
        except Exception as err:  # never let hostile input stop the consumer; keep it in the log at least
            log.critical("cannot dead-letter a message from %s (%s): %s — the message: %r", queue, reason, err,
                         raw if not isinstance(raw, bytes | str) else raw[:2000])

    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                # if there's a ConnectionError, disconnect so the next iteration will reconnect automatically.
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            try:
                raw = loads(bytes_to_str(item))
            except Exception as err:  # not UTF-8 or not JSON: already popped, so keep it now or lose it
                self._dead_letter(item, f"not a JSON message ({type(err).__name__}: {err})"[:300], dest)
                return True
            self.connection._deliver(raw, dest)
            return True
        finally:
            self._in_poll = None
            flush = getattr(self, "_flush_brpop_reauth", None)  # kombu ≥ 5.7
            if flush is not None:
                flush()


class GuardedTransport(kombu_redis.Transport):
    Channel = GuardedChannel


ALIAS = "lookalike-redis"  # how logs name the transport ("lookalike-redis://:**@host:6379/0")


def use_guarded_transport(connection: Any) -> Any:
    """Make a not yet connected kombu ``connection`` to Redis use ``GuardedTransport`` (other brokers are
    left alone). The URL's own settings (``rediss``, SSL options) are kept: only the class changes."""
    from kombu.transport import TRANSPORT_ALIASES

    if connection.transport_cls in ("redis", "rediss", kombu_redis.Transport):
        TRANSPORT_ALIASES.setdefault(ALIAS, f"{__name__}:GuardedTransport")
        connection.transport_cls = ALIAS
    return connection


__all__ = ["ALIAS", "GuardedChannel", "GuardedQoS", "GuardedTransport", "use_guarded_transport"]
