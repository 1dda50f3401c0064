"""The application factory's process-wide start-up work."""

from __future__ import annotations

import gc

from fastapi.testclient import TestClient

from outreach.service.runtime import Runtime, freeze_startup_heap
from outreach.web import create_app


def test_start_up_moves_the_heap_out_of_the_collectors_sight(runtime: Runtime) -> None:
    with TestClient(create_app(runtime)) as client:
        # What start-up built is frozen: full collections no longer walk it on every webhook batch.
        assert gc.get_freeze_count() > 10_000
        assert client.get("/healthz").status_code in (200, 503)
    made_since = [[n] for n in range(1000)]  # a second freeze would take these too
    frozen = gc.get_freeze_count()
    freeze_startup_heap()  # once per process: a second app (tests, reloads) does not freeze again
    assert gc.get_freeze_count() <= frozen  # (frozen objects that are freed leave the count)
    assert len(made_since) == 1000
