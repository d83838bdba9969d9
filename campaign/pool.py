"""What evaluates a campaign's packs of shards: Ray actors, or this process.

The Ray pool puts the campaign's inputs (spec, images, bounds, handed-over models) in the object
store once and passes them by reference, defines the actor class once, and spreads the actors
over the cluster's nodes. Fault tolerance is the pool's, not Ray's ``max_restarts``: a restarted
actor keeps its queued tasks, and where its node is gone and no slot is free it waits for a
slot that may never come back; the pool instead moves a dead actor's packs to the actors that
live, asks for a replacement, and gives it work only once it is built (a replacement that
never starts just never gets work). Each pack is deterministic, so a retry rewrites the same
rows to the same path."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from torch import nn
from tqdm.auto import tqdm

from bitstorm.errors import BitstormError, DataError
from bitstorm.logs import get_logger
from campaign.images import CampaignImages
from campaign.plan import Pack
from campaign.profile import Profile
from campaign.spec import CampaignSpec
from campaign.store import Store
from campaign.worker import ShardWorker

log = get_logger(__name__)
MAX_RETRIES = 3  # deaths of one pack's actors, or failed constructors of one slot's actors
IN_FLIGHT_PER_ACTOR = 2


class Pool(ABC):
    """Kept across the rounds of a sequential campaign so models and golden caches load once;
    ``store``: where the driver opened the output (its file system carries the endpoint to the
    actors); ``models``: handed over (campaign.api), else each worker loads the spec's.
    ``trials_by_node``: where the trials ran, ``settled``: how many needed no forward (the
    engine's masking), ``run_seconds``: how long running them took (the manifest records all
    three)."""

    def __init__(
        self,
        spec: CampaignSpec,
        store: Store,
        images: dict[str, CampaignImages],
        profile: Profile | None,
        progress: bool,
        models: Mapping[str, nn.Module] | None = None,
    ) -> None:
        self.spec, self.store, self.images = spec, store, images
        self.profile, self.progress = profile, progress
        self.models = models
        self.trials_by_node: Counter[str] = Counter()
        self.settled: Counter[str] = Counter()  # per technique (campaign.faults.masking)
        self.run_seconds = 0.0

    def _count(self, node: str, result: Mapping[str, Any]) -> int:
        """Record one pack's result from ``node``; its trials."""
        self.trials_by_node[node] += result["rows"]
        self.settled.update(result.get("settled", {}))  # a census pack runs no suffix
        return result["rows"]

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *_exc: object) -> None:  # noqa: B027 - in-process: nothing to release
        pass

    def start(self, wanted: int) -> None:  # noqa: B027 - in-process: nothing to start
        """Start building up to ``wanted`` workers (they build in parallel)."""

    @abstractmethod
    def golden_table(self, model: str) -> pa.Table:
        """``model``'s golden table from a worker's golden pass."""

    @abstractmethod
    def use_golden(self, tables: Mapping[str, pa.Table]) -> None:
        """Hand every worker, present and future, the golden tables the campaign wrote."""

    @abstractmethod
    def run(self, pending: list[Pack], done: int, total: int, label: str) -> None:
        """Evaluate ``pending`` (``done`` of ``total`` trials are on disk already)."""


@dataclass
class _Slot:
    """One actor place of the pool: its current actor, how many it had, and where it runs
    (None until the actor is built)."""

    actor: Any
    ready: Any  # the ObjectRef of its ``ready()`` call
    generation: int = 0
    node: str | None = None
    failures: int = 0  # actors of this slot whose constructor raised


class ShardPool(Pool):
    """Ray actors that evaluate packs, replacing actors that die (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        import ray

        super().__init__(*args, **kwargs)
        self.worker_class = ray.remote(ShardWorker)
        # one copy of each input in the object store, whatever the number of actors
        inputs = (self.spec, self.store, self.images, self.profile, self.models)
        self.inputs = [ray.put(x) for x in inputs]
        self.golden: Any = None
        self.slots: list[_Slot] = []

    def __exit__(self, *_exc: object) -> None:
        import ray

        for slot in self.slots:
            ray.kill(slot.actor)

    def _start(self, position: int, generation: int = 0) -> _Slot:
        resources = self.spec.resources
        actor = self.worker_class.options(
            name=f"bitstorm-{self.spec.name}-worker-{position}-{generation}",
            num_cpus=resources.cpus_per_actor,
            num_gpus=resources.gpus_per_actor,
            scheduling_strategy="SPREAD",
            max_restarts=0,
        ).remote(*self.inputs, threads=max(1, int(resources.cpus_per_actor)))
        if self.golden is not None:
            actor.use_golden.remote(self.golden)  # runs before any pack: actor calls are FIFO
        return _Slot(actor, actor.ready.remote(), generation)

    def start(self, wanted: int) -> None:
        while len(self.slots) < min(self.spec.resources.actors, wanted):
            self.slots.append(self._start(len(self.slots)))

    def _replace(self, position: int, failed_to_build: bool) -> None:
        """A fresh actor in ``position``'s place. Actors whose constructor raised count against
        ``MAX_RETRIES`` (the same constructor raises again); actors lost with their node do
        not (one made while Ray still thought that node alive dies too, and its successor
        waits for a free slot)."""
        old = self.slots[position]
        failures = old.failures + failed_to_build
        if failures >= MAX_RETRIES:
            raise DataError(
                f"{failures} workers of slot {position} failed while they were built (see "
                "the Ray logs: out of memory? a model that does not load on that node?)"
            )
        log.warning("actor %d died; its work goes to the others and a fresh actor", position)
        self.slots[position] = self._start(position, old.generation + 1)
        self.slots[position].failures = failures

    def golden_table(self, model: str) -> pa.Table:
        import ray

        self.start(1)
        return ray.get(self.slots[0].actor.golden_table.remote(model))

    def use_golden(self, tables: Mapping[str, pa.Table]) -> None:
        import ray

        self.golden = ray.put(dict(tables))
        for slot in self.slots:
            slot.actor.use_golden.remote(self.golden)

    def run(self, pending: list[Pack], done: int, total: int, label: str) -> None:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        self.start(len(pending))
        queue: deque[Pack] = deque(pending)
        in_flight: dict[Any, tuple[Pack, int, int]] = {}
        retries: Counter[int] = Counter()

        def submit(position: int) -> None:
            slot = self.slots[position]
            if slot.node is None:
                return  # not built yet: work goes to actors that are
            busy = sum(1 for _, p, g in in_flight.values() if (p, g) == (position, slot.generation))
            for _ in range(IN_FLIGHT_PER_ACTOR - busy):
                if not queue:
                    return
                pack = queue.popleft()
                in_flight[slot.actor.run.remote(pack)] = (pack, position, slot.generation)

        for position in range(len(self.slots)):
            submit(position)
        bar = progress_bar(self.spec, done, total, label, self.progress)
        started = time.perf_counter()
        while queue or in_flight:
            building = {s.ready: p for p, s in enumerate(self.slots) if s.node is None}
            ready, _ = ray.wait([*in_flight, *building], num_returns=1)
            if ready[0] in building:
                position = building[ready[0]]
                try:
                    self.slots[position].node = ray.get(ready[0])
                except RayActorError as error:
                    self._replace(position, failed_to_build=error.actor_init_failed)
                    continue
                log.info("actor %d is ready on node %s", position, self.slots[position].node)
                submit(position)
                continue
            pack, position, generation = in_flight.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except RayTaskError as error:  # a user's to fix (a full disk): their message, once
                if isinstance(error.cause, BitstormError):
                    raise error.cause from None
                raise
            except RayActorError:
                retries[pack.id] += 1
                if retries[pack.id] > MAX_RETRIES:
                    raise DataError(
                        f"shard {pack.id} failed {MAX_RETRIES} times: its actors keep dying "
                        "(out of memory?)"
                    ) from None
                queue.appendleft(pack)
                if generation == self.slots[position].generation:  # first we hear of it
                    self._replace(position, failed_to_build=False)
                for other in range(len(self.slots)):
                    submit(other)
                continue
            bar.update(self._count(str(self.slots[position].node), result))
            submit(position)
        bar.close()
        seconds = time.perf_counter() - started
        self.run_seconds += seconds
        log.info("ran %d files of shards in %.1f s", len(pending), seconds)


class LocalPool(Pool):
    """Packs evaluated one after another in this process, no Ray (campaign.api's default):
    the same worker, so the same rows as the actors write."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.worker = ShardWorker(self.spec, self.store, self.images, self.profile, self.models)

    def golden_table(self, model: str) -> pa.Table:
        return self.worker.golden_table(model)

    def use_golden(self, tables: Mapping[str, pa.Table]) -> None:
        self.worker.use_golden(tables)

    def run(self, pending: list[Pack], done: int, total: int, label: str) -> None:
        bar = progress_bar(self.spec, done, total, label, self.progress)
        started = time.perf_counter()
        for pack in pending:
            bar.update(self._count("local", self.worker.run(pack)))
        bar.close()
        self.run_seconds += time.perf_counter() - started


def progress_bar(spec: CampaignSpec, done: int, total: int, label: str, show: bool) -> tqdm:
    return tqdm(
        total=total,
        initial=done,
        unit="trial",
        unit_scale=True,
        disable=not show,
        desc=f"campaign {spec.name}{label}",
    )
