"""The control plane scales out: two ``agentpg serve`` processes on one catalog serve the same users."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import leakscan
from api_support import LiveServer, bearer, uid

from agentpg.app.runtime import Runtime


def test_two_instances_share_users_and_take_turns_at_background_jobs(
        runtime: Runtime, agentpg_home: Path, admin_token: str, tmp_path: Path) -> None:
    # A short sync interval on both, so both keep trying to run the job while the test works.
    env = {"AGENTPG_USAGE_SYNC_INTERVAL_S": "0.5"}
    a = LiveServer(agentpg_home, tmp_path / "a.log", env)
    b = LiveServer(agentpg_home, tmp_path / "b.log", env)
    try:
        a.wait_ready()
        b.wait_ready()
        h = bearer(admin_token)
        with httpx.Client(base_url=a.base_url, headers=h, timeout=60) as ca, \
                httpx.Client(base_url=b.base_url, headers=h, timeout=60) as cb:
            u = uid("scale")
            assert ca.post("/api/users", json={"id": u}).status_code == 201
            assert cb.get(f"/api/users/{u}").json()["global_database"]["status"] == "ready"
            w = uid("w")
            assert cb.post(f"/api/users/{u}/workspaces", json={"id": w}).status_code == 201
            assert [x["id"] for x in ca.get(f"/api/users/{u}/workspaces").json()["items"]] == [w]

            # The same new ids sent to both instances at once: each user exists exactly once.
            ids = [uid("scale") for _ in range(10)]

            def register(job: tuple[int, str]) -> int:
                client = ca if job[0] % 2 else cb
                return client.post("/api/users", json={"id": job[1]}).status_code

            with ThreadPoolExecutor(max_workers=8) as pool:
                codes = list(pool.map(register, enumerate(ids + ids)))
            assert sorted(codes) == [201] * 10 + [409] * 10
            listed = {x["id"] for x in ca.get("/api/users", params={"limit": 500}).json()["items"]}
            assert set(ids) <= listed

            time.sleep(2)  # several sync intervals on both instances
            for user_id in [*ids, u]:
                assert (cb if user_id in ids[:5] else ca).delete(f"/api/users/{user_id}").status_code == 204
            for user_id in [*ids, u]:
                assert ca.get(f"/api/users/{user_id}").status_code == 404
    finally:
        logs = [a.output(), b.output()]
        codes = [a.stop(), b.stop()]
        for log in logs:
            leakscan.record("agentpg serve output (scale-out)", log)
    assert all(code in (0, -15) for code in codes), codes
    assert not any("usage sync failed" in log or "Traceback" in log for log in logs), logs
    synced = sum(log.count("usage sync:") for log in logs)
    assert synced >= 1  # the job ran; the advisory lock keeps each run to one instance (test_budgets)


