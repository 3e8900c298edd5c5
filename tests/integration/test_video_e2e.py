"""Video uploads end to end over the real stack: ``moderation serve`` over HTTP, Redis, a
``moderation worker`` process, SQLite. An MP4 that flashes a banked photo for 0.4 s is blocked
with the matched frame's time; an unrelated WebM is allowed; a truncated MOV is unscannable; a
video over ``max_video_bytes`` is refused with 413 and a Matroska (non-WebM) file with 415."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from moderation.service.platform_client import ApiError, ModerationClient
from tests.integration.queue_stack import RedisServer, Stack
from tests.video_clips import clip, encode, photo, solid

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def test_video_uploads_over_the_real_stack(
    make_stack: Callable[..., Stack], redis_server: RedisServer
) -> None:
    banned = clip([(photo("rocket"), 1.5), (photo("astronaut"), 0.4), (photo("horse"), 1.5)])
    unrelated = clip([(photo("rocket"), 1.0), (photo("motorcycle_left"), 1.0)], "webm")
    broken = clip([(photo("rocket"), 1.0), (photo("horse"), 1.0)], "mov")
    stack = make_stack(
        database_url=None, broker_url=redis_server.url, max_video_bytes=len(banned) + 10
    )
    client, _ = stack.start_all([])
    api = ModerationClient(stack.base_url, client.token)

    ids = {
        name: api.submit(data, external_id=name, subject_id="u1")["id"]
        for name, data in (
            ("banned", banned),
            ("unrelated", unrelated),
            ("broken", broken[: len(broken) // 2]),
        )
    }
    views = {name: api.wait(upload_id, timeout=240) for name, upload_id in ids.items()}

    result = views["banned"]["result"]
    assert result["decision"] == "block", result
    assert result["matches"][0]["label"] == "astronaut"
    assert result["matches"][0]["timestamp_s"] == pytest.approx(1.5)
    assert views["unrelated"]["result"]["decision"] == "allow"
    assert views["unrelated"]["result"]["matches"] == []
    assert views["broken"]["result"]["decision"] == "unscannable"
    assert views["broken"]["result"]["reason"] == "truncated"

    with pytest.raises(ApiError) as too_big:
        api.submit(banned + bytes(64), external_id="big", subject_id="u1")
    assert too_big.value.status == 413
    with pytest.raises(ApiError) as refused:
        api.submit(encode("matroska", "mpeg4", solid(1)), external_id="mkv", subject_id="u1")
    assert refused.value.status == 415
    assert "MP4, MOV, WebM" in refused.value.message
