"""The SQS receiver's slot accounting: never more long polls in flight than free slots.

The polls here are a function the test controls (the seam the receiver is built on); the real
SQS behaviour is covered against moto server in tests/integration/test_sqs_backend.py.
"""

import threading
import time
from typing import Any

from agent.queues.sqs_receiver import Received, Receiver


class Polls:
    """Hands out the messages queued in ``messages`` one per poll; other polls wait for stop."""

    def __init__(self, messages: list[dict[str, Any]]) -> None:
        self.messages = messages
        self.started = 0
        self.released: list[Received] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def poll(self, client: Any, url: str, wait: int) -> list[dict[str, Any]]:
        with self.lock:
            self.started += 1
            if self.messages:
                return [self.messages.pop(0)]
        self.stop.wait(10)
        return []

    def receiver(self, queues: dict[str, str]) -> Receiver:
        return Receiver(
            self.poll,
            new_client=lambda: None,
            queues=lambda: queues,
            may_poll=lambda name: True,
            wake=lambda: None,
            wait=20,
            release=lambda client, received: self.released.append(received),
        )


def wait_for(condition: Any, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_taking_a_message_claims_its_slot_before_any_poll_can_start() -> None:
    polls = Polls([{"MessageId": "1"}])
    receiver = polls.receiver({"q": "url-q"})
    receiver.capacity(1)
    wait_for(lambda: receiver.arrived)
    for _ in range(200):  # the window the old code had: a poll between take and capacity
        found, passed_over = receiver.take(unwanted=lambda queue: False)
        if found is not None:
            break
    assert found is not None
    assert passed_over == []
    assert receiver.target == 0
    time.sleep(0.3)
    assert polls.started == 1, "a poll started for a slot that was just taken"
    polls.stop.set()
    assert receiver.stop() == []


def test_unwanted_messages_are_passed_over_and_free_their_place() -> None:
    polls = Polls([{"MessageId": "1"}, {"MessageId": "2"}])
    receiver = polls.receiver({"paused": "url-p", "served": "url-s"})
    receiver.capacity(2)
    wait_for(lambda: len(receiver.arrived) == 2)
    first, second = receiver.arrived  # polls on the two queues, in either order
    found, passed_over = receiver.take(unwanted=lambda queue: queue == first.queue)
    assert (found, passed_over) == (second, [first])
    assert receiver.target == 1
    # The passed-over message's place is free again: one poll waits for the one free slot.
    wait_for(lambda: polls.started == 3)
    polls.stop.set()
    receiver.stop()
