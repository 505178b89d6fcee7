"""Prometheus collectors of the shared machinery (the connection governor, the reaper, the storage check),
registered by the assembly on the app's own registry; read at scrape time."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agentpg.access.governor import Governor
from agentpg.access.guard import Reaper
from agentpg.lifecycle.cpu_shares import CpuSharesCollector
from agentpg.usage.storage import StorageCollector

__all__ = ["CpuSharesCollector", "GovernorCollector", "ReaperCollector", "StorageCollector"]


class ReaperCollector(Collector):
    """Backends agentpg terminated after giving up on their statement (issue 18), read at scrape time."""

    def __init__(self, reaper: Reaper) -> None:
        self._reaper = reaper

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily("agentpg_backends_terminated", "Tenant backends agentpg ended with "
                                     "pg_terminate_backend after giving up on their statement, by outcome.",
                                     labels=["outcome"])
        family.add_metric(["gone"], self._reaper.terminated)
        family.add_metric(["failed"], self._reaper.failed)
        yield family


class GovernorCollector(Collector):
    """The connection governor's figures, read at scrape time, labelled by server (``host:port``, as many as
    the fleet has). Per user only by *rank* (``rank`` 1-5: the calls of the five busiest users, no user id):
    no tenant identifier becomes a label and cardinality stays bounded."""

    def __init__(self, governor: Governor) -> None:
        self._governor = governor

    def collect(self) -> Iterable[Metric]:
        snaps = self._governor.snapshot()
        gauges = {
            "budget": GaugeMetricFamily("agentpg_governor_budget", "Connections this process may hold on the "
                                        "server.", labels=["server"]),
            "open": GaugeMetricFamily("agentpg_governor_connections_open", "Tenant connections open (or "
                                      "opening) on the server.", labels=["server"]),
            "granted": GaugeMetricFamily("agentpg_governor_connections_granted", "Connections the pools are "
                                         "allowed to hold on the server (never over the budget).", labels=["server"]),
            "calls": GaugeMetricFamily("agentpg_governor_calls_in_use", "Calls holding a connection slot of the "
                                       "server.", labels=["server"]),
            "queue": GaugeMetricFamily("agentpg_governor_queue_length", "Calls waiting for a slot of the server.",
                                       labels=["server"]),
            "users": GaugeMetricFamily("agentpg_governor_users", "Users with calls on the server.",
                                       labels=["server"]),
            "top": GaugeMetricFamily("agentpg_governor_user_calls_in_use", "Calls in use of the busiest users of "
                                     "the server, by rank (1 = busiest; no user id).", labels=["server", "rank"]),
        }
        counters = {
            "waits": CounterMetricFamily("agentpg_governor_waits", "Calls that queued for a slot of the server.",
                                         labels=["server"]),
            "refusals": CounterMetricFamily("agentpg_governor_refusals", "Calls answered server_busy (429) after "
                                            "waiting.", labels=["server"]),
            "terminations": CounterMetricFamily("agentpg_governor_idle_closed", "Idle connections of other pools "
                                                "closed to make room.", labels=["server"]),
            "slot_refusals": CounterMetricFamily("agentpg_governor_slot_refusals", "Connects the server refused "
                                                 "for want of a slot although the budget allowed them (other "
                                                 "clients hold slots; the budget is lowered for a while).",
                                                 labels=["server"]),
        }
        for snap in snaps:
            for name, value in (("budget", snap.budget), ("open", snap.open), ("granted", snap.granted),
                                ("calls", snap.calls), ("queue", snap.queue), ("users", snap.users)):
                gauges[name].add_metric([snap.server], value)
            for rank, calls in enumerate(snap.top_user_calls, start=1):
                gauges["top"].add_metric([snap.server, str(rank)], calls)
            counters["waits"].add_metric([snap.server], snap.stats.waits)
            counters["refusals"].add_metric([snap.server], snap.stats.refusals)
            counters["terminations"].add_metric([snap.server], snap.stats.terminations)
            counters["slot_refusals"].add_metric([snap.server], snap.stats.slot_refusals)
        yield from gauges.values()
        yield from counters.values()
