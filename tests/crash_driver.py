"""Run mixed lifecycle operations until killed: the victim of tests/test_crash_chaos.py.

    python crash_driver.py SEED START COUNT

Operation i is drawn from ``random.Random(SEED * 100_003 + i)``, so a restarted driver that resumes at i
does the same thing the killed one was doing. It prints ``done i`` after each operation, flushed, so the
test knows where to resume. Refusals (the user already exists, the workspace is gone) are fine: the
killed run may have finished the operation before it could say so.
"""

from __future__ import annotations

import random
import sys

from sqlalchemy import select

from agentpg.app.runtime import open_runtime
from agentpg.catalog.models import User, Workspace
from agentpg.errors import Conflict, NotFound


def main() -> None:
    seed, start, count = (int(a) for a in sys.argv[1:4])
    with open_runtime() as rt:
        svc = rt.service
        print("ready", flush=True)
        for i in range(start, count):
            rng = random.Random(seed * 100_003 + i)
            with svc.deps.sessions() as s:
                users = sorted(s.scalars(select(User.id).where(User.status == "active")))
                workspaces = sorted(s.scalars(select(Workspace.id).where(Workspace.status == "active")))
            roll = rng.random()
            try:
                if roll < 0.4 or not users:
                    svc.register_user(f"chaos-{seed}-{i}")
                elif roll < 0.7:
                    svc.create_workspace(rng.choice(users), f"chaos-w-{seed}-{i}")
                elif roll < 0.85 and workspaces:
                    svc.delete_workspace(rng.choice(workspaces))
                else:
                    svc.delete_user(rng.choice(users))
            except (Conflict, NotFound):
                pass
            print(f"done {i}", flush=True)


if __name__ == "__main__":
    main()
