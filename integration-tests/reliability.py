"""Helpers of the reliability tests: metrics scrapes, idle waits and bounded HTTP clients.

Every client call has a timeout, and every address is the server's 127.0.0.1 URL.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from functools import lru_cache

import aiohttp
import requests
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from harness import STORIES, Server

Labels = frozenset[tuple[str, str]]


def scrape(server: Server) -> dict[tuple[str, Labels], float]:
    """Every sample of /metrics, keyed by (name, labels)."""
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def sample(values: dict[tuple[str, Labels], float], name: str, **labels: str) -> float:
    """One sample of a scrape (0 when it was never recorded)."""
    return values.get((name, frozenset(labels.items())), 0.0)


IDLE_GAUGES = ("shardgen_kv_blocks_used", "shardgen_queue_size", "shardgen_batch_current_size")


def wait_idle(server: Server, timeout_s: float = 30.0) -> dict[tuple[str, Labels], float]:
    """Scrape until no block is held and nothing is queued or running; the last scrape."""
    deadline = time.monotonic() + timeout_s
    while True:
        values = scrape(server)
        if all(sample(values, name) == 0 for name in IDLE_GAUGES):
            return values
        if time.monotonic() > deadline:
            raise AssertionError(f"not idle after {timeout_s} s: "
                                 f"{ {name: sample(values, name) for name in IDLE_GAUGES} }")
        time.sleep(0.2)


def generate(server: Server, inputs: str, headers: dict[str, str] | None = None,
             timeout_s: float = 120.0, **parameters: object) -> requests.Response:
    return requests.post(f"{server.url}/generate", headers=headers, timeout=timeout_s,
                         json={"inputs": inputs, "parameters": parameters})


def greedy_ids(server: Server, inputs: str, max_new_tokens: int, **parameters: object) -> list[int]:
    """The token ids of a greedy request run alone."""
    response = generate(server, inputs, max_new_tokens=max_new_tokens, details=True, **parameters)
    assert response.status_code == 200, response.text
    return [token["id"] for token in response.json()["details"]["tokens"]]


@lru_cache(maxsize=1)
def stories_tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(STORIES)


def marker_ids(text: str) -> list[int]:
    """The ids `text` adds after BOS when it is a whole prompt (a fault marker)."""
    return stories_tokenizer()(text)["input_ids"][1:]


# A prompt that begins with this text makes every step that carries it take 50 ms on a
# server started with slow_env() (shard/faults.py), however fast the machine is.
SLOW_MARKER = "Zebra quartz slow"


def slow_env() -> dict[str, str]:
    return {"SHARDGEN_FAULT_INJECTION": f"slow={','.join(map(str, marker_ids(SLOW_MARKER)))}"}


@dataclass
class StreamResult:
    """What one /generate_stream client saw."""

    status: int
    events: list[dict] = field(default_factory=list)
    body: dict | None = None          # the JSON error of a non-200 answer
    sent: float = 0.0                 # monotonic times
    answered: float = 0.0             # status line received
    ended: float = 0.0
    disconnected: bool = False        # the client closed the connection itself
    dropped: bool = False             # the server closed it before the stream ended

    @property
    def ids(self) -> list[int]:
        return [event["token"]["id"] for event in self.events if "token" in event]

    @property
    def finished(self) -> bool:
        return bool(self.events) and self.events[-1].get("generated_text") is not None

    @property
    def error(self) -> dict | None:
        """The error event that ended the stream, if one did."""
        return self.events[-1] if self.events and "error" in self.events[-1] else None


async def stream(session: aiohttp.ClientSession, server: Server, inputs: str, *,
                 headers: dict[str, str] | None = None, disconnect_after: int | None = None,
                 on_event: asyncio.Event | None = None, timeout_s: float = 300.0,
                 **parameters: object) -> StreamResult:
    """POST /generate_stream and read events until the end, an error, or disconnect_after
    events (then the connection is closed). on_event is set at the first event."""
    result = StreamResult(status=0, sent=time.monotonic())
    body = {"inputs": inputs, "parameters": parameters}
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with session.post(f"{server.url}/generate_stream", json=body, headers=headers,
                                timeout=timeout) as response:
            result.status, result.answered = response.status, time.monotonic()
            if response.status != 200:
                result.body = await response.json(content_type=None)
                return result
            async for line in response.content:
                if not line.startswith(b"data:"):
                    continue
                result.events.append(json.loads(line[len(b"data:"):]))
                if on_event is not None:
                    on_event.set()
                if disconnect_after is not None and len(result.events) >= disconnect_after:
                    result.disconnected = True
                    response.close()  # drops the connection, as a client that goes away
                    break
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
        result.dropped = True
    finally:
        result.ended = time.monotonic()
    return result


def session() -> aiohttp.ClientSession:
    """A client session without a connection limit (load tests open hundreds)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))
