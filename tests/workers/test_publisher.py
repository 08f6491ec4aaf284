"""The stream publisher's watch over router endpoints (worker.publisher), on real sockets:
a live endpoint is never GONE; one nobody listens on, or whose router process died, is GONE
after the grace period; a malformed one at once; endpoints no job names are closed once
down for the grace and retention periods."""

from __future__ import annotations

from helpers import wait_for
from stream_sink import RouterProcess

from pdserve.bench.stream_collector import StreamCollector
from pdserve.worker.publisher import StreamPublisher


def test_the_publisher_judges_endpoints_by_their_connection():
    live = StreamCollector()
    dying = RouterProcess()
    publisher = StreamPublisher("w", grace_s=0.5, retain_s=0.5)
    nobody = "tcp://127.0.0.1:1"
    try:
        names = {live.endpoint, dying.endpoint, nobody, "not an endpoint"}
        assert publisher.unreachable(names) == ["not an endpoint"]
        publisher.forget("not an endpoint")
        names.discard("not an endpoint")
        gone = wait_for(lambda: publisher.unreachable(names), 30, "an unreachable endpoint")
        assert gone == [nobody]
        publisher.forget(nobody)
        names.discard(nobody)
        dying.kill()
        gone = wait_for(lambda: publisher.unreachable(names), 30, "the dead router")
        assert gone == [dying.endpoint]
        # named no more: kept for the retention period, then forgotten by itself; a live
        # endpoint is never reported
        assert publisher.unreachable({live.endpoint}) == []
        assert dying.endpoint in publisher.watched
        wait_for(lambda: not publisher.unreachable({live.endpoint})
                 and dying.endpoint not in publisher.watched, 30, "the retention period")
        assert publisher.watched == {live.endpoint}
    finally:
        publisher.close()
        live.close()
        dying.kill()
