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
* ``GuardedChannel._brpop_start``/``_brpop_read``: a message is never only in this process's memory.
  kombu takes a message with ``BRPOP``: from the moment Redis pops it until kombu writes its ``unacked``
  entry, the message exists only in the socket buffer and the process — a worker SIGKILLed then (the soak
  test hit it: one chunk of 6 events lost) or stopped with the reply unread (celery/celery#4354) loses it.
  Here a message is *moved* instead, atomically, from its queue to a list of this consumer's
  (``lookalike:inflight:<holder>#<session>:<queue key>``, registered in ``lookalike:inflight`` with its
  holder record before the first take): a Lua script takes from the first non-empty queue in priority order;
  when all are empty, ``BRPOPLPUSH`` waits on the first one for up to ``brpop_timeout`` (1 s), then the
  script runs again (so an idle worker finds backfill within a second and uploads at once). The message
  leaves that list in the same MULTI that writes its ``unacked``/holder entries (or once it is
  dead-lettered); ``workers.recovery`` puts what a dead holder, or an earlier connection of this one, left
  there back on its queue. With a ``global_keyprefix`` or without a running monitor, kombu's ``BRPOP`` is
  used unchanged.
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
        taken = getattr(self.channel, "_taken", None)
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()}) \
                .hset(self.unacked_key, delivery_tag, dumps([message._raw, exchange, routing_key])) \
                .hset(recovery.HOLDERS_KEY, delivery_tag, monitor.record(routing_key))
            if taken is not None:  # held now: it leaves this consumer's in-flight list in the same MULTI
                pipe.lrem(taken[0], 1, taken[1])
            pipe.execute()
        if taken is not None:
            self.channel._taken = None
        virtual.QoS.append(self, message, delivery_tag)

    def _remove_from_indices(self, delivery_tag: str, pipe: Any = None) -> Any:
        return super()._remove_from_indices(delivery_tag, pipe).hdel(recovery.HOLDERS_KEY, delivery_tag)


# KEYS: the queue keys in priority order, then each one's in-flight list. Moves the first message found.
TAKE = """
local n = #KEYS / 2
for i = 1, n do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    redis.call('LPUSH', KEYS[n + i], item)
    return {KEYS[i], item}
  end
end
return false
"""

# KEYS: the in-flight list, its queue. ARGV: the item. Puts one taken item back at the head of its queue.
GIVE_BACK = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
"""


class GuardedChannel(kombu_redis.Channel):
    QoS = GuardedQoS
    _taken: tuple[str, bytes] | None = None  # (in-flight list, item) of the message being delivered
    _sent: tuple[str, dict[str, str]] | None = None  # the command awaiting its reply, and the in-flight lists
    _block_next = False  # the last take found every queue empty: wait on the first one next

    def basic_consume(self, queue: str, no_ack: bool, callback: Any, consumer_tag: str, **kwargs: Any) -> Any:
        result = super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)
        acked = self.__dict__.setdefault("_lookalike_acked", set())
        if not no_ack:  # task queues; the control (pidbox) queue is consumed without acks
            self.connection._callbacks[queue] = self._guarded(queue, callback)
            acked.add(queue)
        else:
            acked.discard(queue)
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
        self._forget_taken()

    # -- taking messages without a window in which only this process has them ------------------------
    def _inflight(self, key: str) -> str | None:
        """This consumer's in-flight list for the queue ``key`` (registered before first use), or None when
        kombu's plain BRPOP is used (no monitor in this process, or a global key prefix)."""
        monitor = recovery.current()
        if monitor is None or self.global_keyprefix:
            return None
        name = recovery.inflight_key(monitor, key)
        registered = self.__dict__.setdefault("_lookalike_lists", set())
        if name not in registered:
            with self.conn_or_acquire() as client:
                client.hset(recovery.INFLIGHT_KEY, name, monitor.record(key))
            registered.add(name)
        return name

    def _brpop_start(self, timeout: Any = None) -> None:
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        acked = set(queues) <= self.__dict__.get("_lookalike_acked", set())  # a message taken is then held
        lists = [self._inflight(key) for key in keys] if acked else [None]
        if any(name is None for name in lists):
            self._sent = None
            return super()._brpop_start(timeout)
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()
        if self._block_next:  # every queue was empty: wait on the first (live) one, then look at all again
            self._sent = ("BRPOPLPUSH", {keys[0]: str(lists[0])})
            self.client.connection.send_command("BRPOPLPUSH", keys[0], lists[0], timeout or 1)
        else:
            self._sent = ("EVAL", dict(zip(keys, map(str, lists), strict=True)))
            self.client.connection.send_command("EVAL", TAKE, 2 * len(keys), *keys, *lists)

    def _read_taken(self, **options: Any) -> tuple[str, Any] | None:
        """The reply to what ``_brpop_start`` sent: (queue key, item) or None. A moved item is remembered as
        taken (``_taken``) until it is held or dead-lettered."""
        sent, self._sent = self._sent, None
        if sent is None:  # kombu's BRPOP
            dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            return (bytes_to_str(dest__item[0]), dest__item[1]) if dest__item else None
        command, lists = sent
        reply = self.client.parse_response(self.client.connection, command, **options)
        self._block_next = command == "EVAL" and not reply
        if not reply:
            return None
        key, item = (next(iter(lists)), reply) if command == "BRPOPLPUSH" else (bytes_to_str(reply[0]), reply[1])
        self._taken = (lists[key], item)
        return key, item

    def _forget_taken(self) -> None:
        """The message being delivered was dealt with (dead-lettered): drop it from the in-flight list."""
        taken, self._taken = self._taken, None
        if taken is not None:
            with self.conn_or_acquire() as client:
                client.lrem(taken[0], 1, taken[1])

    def _give_back(self, queue_key: str) -> None:
        """Delivery failed before the message was held: put it back at the head of its queue."""
        taken, self._taken = self._taken, None
        if taken is not None:
            with self.conn_or_acquire() as client:
                client.eval(GIVE_BACK, 2, taken[0], queue_key, taken[1])

    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                taken = self._read_taken(**options)
            except self.connection_errors:
                # if there's a ConnectionError, disconnect so the next iteration will reconnect automatically.
                # (A message moved meanwhile stays in this session's in-flight list: workers.recovery puts it
                # back once the consumer has reconnected.)
                self.client.connection.disconnect()
                raise
            if not taken:
                raise Empty()
            key, item = taken
            dest = key.rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            try:
                raw = loads(bytes_to_str(item))
            except Exception as err:  # not UTF-8 or not JSON: keep it as a dead letter, it can never run
                self._dead_letter(item, f"not a JSON message ({type(err).__name__}: {err})"[:300], dest)
                return True
            try:
                self.connection._deliver(raw, dest)
            except self.connection_errors:
                raise  # it stays in this session's in-flight list; recovery puts it back after the reconnect
            except BaseException:
                self._give_back(key)
                raise
            if self._taken is not None:  # not held (kombu found no consumer and restored it): not ours
                self._forget_taken()
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
