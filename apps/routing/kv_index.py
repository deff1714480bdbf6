"""Which KV blocks each model replica's engine holds, learned from the engines' KV-cache events.

An engine started with `engine.kv_cache_events` publishes, over ZMQ, every block it caches
(`BlockStored`: the blocks' hashes, their parent's hash and their tokens) and every block it evicts
(`BlockRemoved`). Two halves use them:

- In each model replica, a `KVCacheMirror` follows its own engine's events from the engine's
  start, so it never misses a block, and keeps the set of blocks the engine holds under hashes of
  our own (below). It republishes that set for the ingress replicas on a port of its own: each
  change as it happens, and the whole set every `SNAPSHOT_PERIOD_S`.
- In each ingress process, a `KVEventSubscriber` (one SUB socket, one thread) follows the mirrors
  of the replicas its routers meet and keeps a `KVIndex`: per replica, the blocks it holds. An
  ingress replica that starts late, or loses messages, is in step again at the next snapshot; until
  then the router counts that replica's cache as unknown (`apps.routing.router`).

Our hashes, not vLLM's: vLLM seeds its block hashes per process unless `PYTHONHASHSEED` is fixed
on every engine, and they depend on its hash function. Here each stored block gets a hash chained
like vLLM's, over (our hash of the parent block, the block's extra key such as a LoRA name, the
block's tokens). A tuple of ints hashes the same in every process, so the mirror and the router
(`prompt_block_hashes` over the prompt tokenized as the engine does, `apps.routing.prompt_tokens`) agree.
The mirror can chain every block because it has seen every parent since the engine started.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("ray.serve")

# A block's hash as this module chains it (`block_hash`).
BlockHash = int
# vLLM's own block hash as an event carries it (an int, or bytes for sha256 hashing).
EngineHash = int | bytes
# The device tier whose blocks a request reuses without a transfer; events of offload tiers
# (CPU, storage) are ignored. vLLM labels the CPU backend's own cache "GPU" too.
CACHE_MEDIUM = "GPU"
# The parent of a prompt's first block.
ROOT: BlockHash = 0
# How long a socket-polling thread waits for a message before it does its periodic work.
POLL_MS = 200
# How often a mirror republishes its whole set: how long a subscriber that joined late, or lost a
# message, routes by the prefix hash. A set of N blocks is about 9 x N bytes.
SNAPSHOT_PERIOD_S = 5.0
# A replica whose mirror has sent no snapshot for this long is out of step (its process hangs, or
# the network between them is down).
STALE_AFTER_S = 3 * SNAPSHOT_PERIOD_S
# Engine batches the mirror's socket queues while its thread is busy (vLLM's publisher queues as
# many): the engine steps on while the replica's process holds the GIL.
ENGINE_QUEUE = 100_000
# What a mirror publishes: (topic = replica id, sequence number, msgpack [kind, our hashes]).
STORED, REMOVED, SNAPSHOT = "stored", "removed", "snapshot"
# What a model replica reports in its routing stats (`ModelServer.record_routing_stats`) for the
# router: its mirror's endpoint, the KV block size and the tokenizer's path.
KV_EVENTS_STAT, BLOCK_SIZE_STAT, TOKENIZER_STAT = "kv_events", "block_size", "tokenizer"


def block_hash(parent: BlockHash, tokens: Sequence[int], extra: Any = None) -> BlockHash:
    """Our hash of a full block, chained on its parent's like vLLM's. Ints and tuples of them hash
    alike in every process (str does not, nor None before Python 3.12): an extra key enters as
    its CRC."""
    extra_key = 0 if extra is None else zlib.crc32(repr(_frozen(extra)).encode()) + 1
    return hash((parent, extra_key, *tokens))


def prompt_block_hashes(token_ids: Sequence[int], block_size: int, extra: Any = None) -> list[BlockHash]:
    """The chained hashes of a prompt's full blocks (the engine caches full blocks only). `extra`:
    the extra key each block of the request carries, such as `(lora_name,)` (vLLM's
    `BlockStored.extra_keys`)."""
    hashes: list[BlockHash] = []
    parent = ROOT
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = block_hash(parent, token_ids[start : start + block_size], extra)
        hashes.append(parent)
    return hashes


def _frozen(extra: Any) -> Any:
    """An event's extra key as a hashable value (msgpack decodes tuples as lists)."""
    if isinstance(extra, list | tuple):
        return tuple(_frozen(item) for item in extra)
    return extra


@dataclass
class EngineBlocks:
    """What one engine holds, from its own events: each engine hash with our hash, and our hashes
    as a set. An engine hash is held once however many times it is stored (vLLM may cache two
    blocks of one hash, and re-reports hits under `kv_cache_report_mode: full`) and dropped at its
    first eviction: the set may under-report a cache, never invent one."""

    ours: dict[EngineHash, BlockHash] = field(default_factory=dict)
    held: set[BlockHash] = field(default_factory=set)

    def apply(self, event: Any) -> tuple[str, list[BlockHash]] | None:
        """Apply one event; the change to the held set it made, if any."""
        if not isinstance(event, dict):
            return None
        kind = event.get("type")
        if kind == "AllBlocksCleared":
            self.clear()
            return SNAPSHOT, []
        if event.get("medium", CACHE_MEDIUM) not in (None, CACHE_MEDIUM):
            return None
        if event.get("group_idx") not in (None, 0):
            return None  # hybrid models: the first KV-cache group stands for the others
        if kind == "BlockStored":
            return STORED, self.store(event)
        if kind == "BlockRemoved":
            return REMOVED, self.remove(event.get("block_hashes") or [])
        return None

    def store(self, event: dict[str, Any]) -> list[BlockHash]:
        parent_hash = event.get("parent_block_hash")
        parent = ROOT if parent_hash is None else self.ours.get(parent_hash)
        if parent is None:
            return []  # a parent never seen (events were lost): these blocks' prefix is unknown
        size = int(event["block_size"])
        tokens = event["token_ids"]
        engine_hashes = event["block_hashes"]
        if len(tokens) != len(engine_hashes) * size:
            return []  # not one full block per hash (a hybrid model's partial or masked blocks)
        extras = event.get("extra_keys") or []
        added = []
        for index, engine_hash in enumerate(engine_hashes):
            extra = extras[index] if index < len(extras) else None
            parent = block_hash(parent, tokens[index * size : (index + 1) * size], extra)
            self.ours[engine_hash] = parent
            if parent not in self.held:
                self.held.add(parent)
                added.append(parent)
        return added

    def remove(self, engine_hashes: Iterable[EngineHash]) -> list[BlockHash]:
        gone = []
        for engine_hash in engine_hashes:
            ours = self.ours.pop(engine_hash, None)
            if ours is not None and ours in self.held:
                self.held.discard(ours)
                gone.append(ours)
        return gone

    def clear(self) -> None:
        self.ours.clear()
        self.held.clear()


def waiting_messages(socket_: Any) -> Iterator[tuple[bytes, int, bytes]]:
    """The (topic, sequence number, payload) messages waiting on a SUB socket, without blocking:
    vLLM's publisher and the mirror both send that shape."""
    import zmq

    while True:
        try:
            topic, seq, payload = socket_.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        except ValueError:
            continue  # another shape
        yield topic, int.from_bytes(seq, "big"), payload


class KVCacheMirror:
    """In a model replica: follows its engine's KV-cache events (the engine publishes on
    `engine_endpoint`, an IPC socket of this replica) and republishes what the engine holds, in
    our hashes, on `endpoint` (a free TCP port of this node) under the replica's id.

    A lost engine batch cannot be made good (vLLM re-reports a block only when it is stored again,
    and a hot block never is): the mirror then says so in its log and stops publishing, so the
    ingress replicas find it stale and count this replica's cache as unknown until it is replaced.
    (vLLM's publisher can replay recent batches on a `replay_endpoint`; not used here.)"""

    def __init__(self, replica_id: str) -> None:
        from ray.util import get_node_ip_address

        self.replica_id = replica_id
        self.blocks = EngineBlocks()
        # vLLM binds an ipc:// endpoint (and would connect to a tcp:// one naming a host).
        self.engine_endpoint = f"ipc://{tempfile.gettempdir()}/kv-events-{os.getpid()}-{replica_id}"
        self._host = get_node_ip_address()
        self.endpoint: str | None = None  # set once the thread has bound its port
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-mirror", daemon=True)
        self._thread.start()
        # Subscribed before the engine starts, so no event is missed.
        if not self._ready.wait(10) or self.endpoint is None:
            raise RuntimeError(f"the KV-cache event mirror of replica {replica_id} did not start")

    def engine_config(self) -> dict[str, Any]:
        """vLLM's KVEventsConfig fields for this replica's engine."""
        return {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": self.engine_endpoint}

    def _run(self) -> None:
        try:
            self._mirror()
        except Exception:
            logger.exception("KV-cache event mirror of replica %s stopped", self.replica_id)
        finally:
            self._ready.set()

    def _mirror(self) -> None:
        import zmq

        context = zmq.Context.instance()
        engine = context.socket(zmq.SUB)
        publisher = context.socket(zmq.PUB)
        try:
            self._republish(engine, publisher)
        finally:  # a stopped mirror holds no engine batches and no port
            engine.close(linger=0)
            publisher.close(linger=0)

    def _republish(self, engine: Any, publisher: Any) -> None:
        import msgspec
        import zmq

        engine.setsockopt(zmq.RCVHWM, ENGINE_QUEUE)
        engine.setsockopt(zmq.SUBSCRIBE, b"")
        engine.connect(self.engine_endpoint)
        port = publisher.bind_to_random_port("tcp://*")
        self.endpoint = f"tcp://{self._host}:{port}"
        self._ready.set()
        topic = self.replica_id.encode()
        seq = 0
        next_engine_seq = 0  # vLLM numbers its batches from 0
        snapshot_due = 0.0

        def publish(kind: str, hashes: list[BlockHash]) -> None:
            nonlocal seq
            publisher.send_multipart((topic, seq.to_bytes(8, "big"), msgspec.msgpack.encode([kind, hashes])))
            seq += 1

        while True:
            if engine.poll(POLL_MS):
                for _, batch_seq, payload in waiting_messages(engine):
                    if batch_seq != next_engine_seq:
                        logger.error(
                            "KV events of replica %s: engine batches %d to %d were lost; routers "
                            "count this replica's cache as unknown until it is replaced",
                            self.replica_id,
                            next_engine_seq,
                            batch_seq - 1,
                        )
                        return
                    next_engine_seq = batch_seq + 1
                    try:
                        events = msgspec.msgpack.decode(payload)[1]
                    except Exception:
                        logger.exception("KV events of replica %s: unreadable batch", self.replica_id)
                        continue
                    for event in events:
                        change = self.blocks.apply(event)
                        if change is None:
                            continue
                        kind, hashes = change
                        if kind == SNAPSHOT:
                            snapshot_due = 0.0
                        elif hashes:
                            publish(kind, hashes)
            now = time.monotonic()
            if now >= snapshot_due:
                publish(SNAPSHOT, list(self.blocks.held))
                snapshot_due = now + SNAPSHOT_PERIOD_S


@dataclass
class ReplicaBlocks:
    """What the ingress knows of one replica's cache: our hashes of the blocks it holds, in step
    with its mirror from a snapshot on."""

    held: set[BlockHash] = field(default_factory=set)
    next_seq: int | None = None  # None: out of step, waiting for a snapshot
    snapshot_at: float = 0.0  # time.monotonic() of the last snapshot


class KVIndex:
    """The blocks held by every replica this process follows, keyed by replica id."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._replicas: dict[str, ReplicaBlocks] = {}

    def apply(self, replica_id: str, seq: int, kind: str, hashes: list[BlockHash]) -> None:
        """Apply one message of a replica's mirror. A snapshot puts the replica in step; a change
        applies only in step (a gap in the sequence means lost messages: out of step until the
        next snapshot)."""
        with self._lock:
            blocks = self._replicas.setdefault(replica_id, ReplicaBlocks())
            if kind == SNAPSHOT:
                blocks.held = set(hashes)
                blocks.next_seq = seq + 1
                blocks.snapshot_at = time.monotonic()
                return
            if blocks.next_seq != seq:
                if blocks.next_seq is not None:
                    logger.warning("KV events of replica %s: lost messages", replica_id)
                blocks.next_seq = None
                return
            blocks.next_seq = seq + 1
            if kind == STORED:
                blocks.held.update(hashes)
            elif kind == REMOVED:
                blocks.held.difference_update(hashes)

    def in_step(self, replica_id: str) -> bool:
        """Whether this process knows what the replica's cache holds: a snapshot arrived, recently
        (a mirror that stopped publishing is stale), and no message was lost since."""
        with self._lock:
            blocks = self._replicas.get(replica_id)
            if blocks is None or blocks.next_seq is None:
                return False
            return time.monotonic() - blocks.snapshot_at < STALE_AFTER_S

    def cached_blocks(self, replica_id: str, hashes: Sequence[BlockHash]) -> int:
        """How many leading blocks of a prompt the replica holds, as far as this process knows."""
        with self._lock:
            blocks = self._replicas.get(replica_id)
            held = blocks.held if blocks is not None else ()
            count = 0
            for block in hashes:
                if block not in held:
                    break
                count += 1
            return count

    def held_blocks(self, replica_id: str) -> int:
        """How many blocks the replica's cache holds, as far as this process knows."""
        with self._lock:
            blocks = self._replicas.get(replica_id)
            return 0 if blocks is None else len(blocks.held)

    def keep_only(self, replica_ids: Iterable[str]) -> None:
        """Forget replicas that are gone."""
        keep = set(replica_ids)
        with self._lock:
            for replica_id in [r for r in self._replicas if r not in keep]:
                del self._replicas[replica_id]


class KVEventSubscriber:
    """In an ingress process: one ZMQ SUB socket, in a daemon thread, connected to the mirror of
    every replica its routers follow, feeding a `KVIndex`."""

    def __init__(self, index: KVIndex) -> None:
        self.index = index
        self._lock = threading.Lock()
        self._wanted: dict[str, dict[str, str]] = {}  # follower -> replica id -> endpoint
        self._unreachable: set[str] = set()  # endpoints ZMQ refused (used by the thread only)
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self._thread.start()

    def follow(self, follower: str, replicas: dict[str, str]) -> None:
        """Subscribe to these replicas' mirrors (replica id -> tcp://host:port) on behalf of
        `follower` (a router: one per model handle), in place of what it followed before."""
        with self._lock:
            if self._wanted.get(follower) != replicas:
                self._wanted[follower] = dict(replicas)

    def unfollow(self, follower: str) -> None:
        with self._lock:
            self._wanted.pop(follower, None)

    def in_step(self, replica_id: str) -> bool:
        """Whether this process knows what the replica's cache holds (`KVIndex.in_step`)."""
        return self.index.in_step(replica_id)

    def _run(self) -> None:
        while True:  # a fault in one message or endpoint must not end routing on KV events
            try:
                self._subscribe()
            except Exception:
                logger.exception("KV-cache event subscriber failed; starting over")
                time.sleep(1)

    def _subscribe(self) -> None:
        import zmq

        socket_ = zmq.Context.instance().socket(zmq.SUB)
        socket_.setsockopt(zmq.LINGER, 0)
        try:
            self._receive(socket_)
        finally:
            socket_.close()

    def _receive(self, socket_: Any) -> None:
        import msgspec
        import zmq

        socket_.setsockopt(zmq.SUBSCRIBE, b"")
        connected: dict[str, str] = {}
        while True:
            self._reconnect(socket_, connected)
            if not socket_.poll(POLL_MS):
                continue
            for topic, seq, payload in waiting_messages(socket_):
                replica_id = topic.decode(errors="replace")
                if replica_id not in connected:
                    continue  # a replica just dropped
                try:
                    kind, hashes = msgspec.msgpack.decode(payload)
                    self.index.apply(replica_id, seq, kind, list(hashes))
                except Exception:
                    logger.exception("KV events of replica %s: unreadable message", replica_id)

    def _reconnect(self, socket_: Any, connected: dict[str, str]) -> None:
        """Connect new endpoints and drop gone ones (from the subscriber's own thread: ZMQ sockets
        are not thread-safe)."""
        with self._lock:
            wanted = {
                rid: endpoint for replicas in self._wanted.values() for rid, endpoint in replicas.items()
            }
        for replica_id, endpoint in list(connected.items()):
            if wanted.get(replica_id) != endpoint:
                socket_.disconnect(endpoint)
                del connected[replica_id]
        for replica_id, endpoint in wanted.items():
            if replica_id not in connected and endpoint not in self._unreachable:
                try:
                    socket_.connect(endpoint)
                except Exception:  # a malformed address: that replica stays out of step
                    logger.exception("KV events of replica %s: cannot connect to %s", replica_id, endpoint)
                    self._unreachable.add(endpoint)
                    continue
                connected[replica_id] = endpoint
        self.index.keep_only(connected)


_shared: KVEventSubscriber | None = None
_shared_lock = threading.Lock()


def shared_subscriber() -> KVEventSubscriber:
    """This process's subscriber and index (started on first use)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = KVEventSubscriber(KVIndex())
        return _shared
