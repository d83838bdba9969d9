"""The actor pool: Ray actors that evaluate shards, a few in flight per actor, replacing actors
that die and retrying their shards (each shard is deterministic, so a retry rewrites the same
rows to the same path)."""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections import Counter, deque
from collections.abc import Mapping
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from bitstorm.errors import BitstormError, DataError
from campaign.images import CampaignImages
from campaign.plan import Shard
from campaign.profile import Profile
from campaign.spec import CampaignSpec
from campaign.store import Store
from campaign.worker import ShardWorker

log = logging.getLogger(__name__)
MAX_SHARD_RETRIES = 3
IN_FLIGHT_PER_ACTOR = 2


class Pool(ABC):
    """What evaluates a campaign's shards, kept across the rounds of a sequential campaign so
    models and golden caches load once; ``store``: where the driver opened the output (its file
    system carries the endpoint to the actors); ``models``: handed over (campaign.api), else
    each worker loads the spec's."""

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

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *_exc: object) -> None:  # noqa: B027 - in-process: nothing to release
        pass

    @abstractmethod
    def run(self, pending: list[Shard], done: int, total: int, label: str) -> None:
        """Evaluate ``pending`` (``done`` of ``total`` trials are on disk already)."""


class ShardPool(Pool):
    """A pool of Ray actors that evaluate shards, replacing actors that die."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.actors: list[Any] = []
        self.generation: list[int] = []

    def __exit__(self, *_exc: object) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)

    def _start(self, slot: int) -> Any:
        import ray

        name = f"bitstorm-{self.spec.name}-worker-{slot}-{self.generation[slot]}"
        resources = self.spec.resources
        options = {"num_cpus": resources.cpus_per_actor, "num_gpus": resources.gpus_per_actor}
        return (
            ray.remote(ShardWorker)
            .options(name=name, **options)
            .remote(
                self.spec,
                self.store,
                self.images,
                self.profile,
                self.models,
                threads=int(resources.cpus_per_actor),
            )
        )

    def run(self, pending: list[Shard], done: int, total: int, label: str) -> None:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        while len(self.actors) < min(self.spec.resources.actors, len(pending)):
            self.generation.append(0)
            self.actors.append(self._start(len(self.actors)))
        queue: deque[Shard] = deque(pending)
        in_flight: dict[Any, tuple[Shard, int, int]] = {}
        retries: Counter[int] = Counter()

        def submit(slot: int) -> None:
            while (
                queue
                and sum(1 for _, s, _ in in_flight.values() if s == slot) < IN_FLIGHT_PER_ACTOR
            ):
                shard = queue.popleft()
                in_flight[self.actors[slot].run.remote(shard)] = (
                    shard,
                    slot,
                    self.generation[slot],
                )

        for slot in range(len(self.actors)):
            submit(slot)
        bar = progress_bar(self.spec, done, total, label, self.progress)
        started = time.perf_counter()
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            shard, slot, born = in_flight.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except RayTaskError as error:  # a user's to fix (a full disk): their message, once
                if isinstance(error.cause, BitstormError):
                    raise error.cause from None
                raise
            except RayActorError:
                retries[shard.id] += 1
                if retries[shard.id] > MAX_SHARD_RETRIES:
                    raise DataError(
                        f"shard {shard.id} failed {MAX_SHARD_RETRIES} times: its "
                        "actors keep dying (out of memory?)"
                    ) from None
                queue.appendleft(shard)
                if born == self.generation[slot]:  # first failure seen from it: replace it
                    log.warning("actor %d died; retrying its shards on a fresh actor", slot)
                    self.generation[slot] += 1
                    self.actors[slot] = self._start(slot)
                submit(slot)
                continue
            bar.update(result["rows"])
            submit(slot)
        bar.close()
        log.info("ran %d shards in %.1f s", len(pending), time.perf_counter() - started)


class LocalPool(Pool):
    """Shards evaluated one after another in this process, no Ray (campaign.api's default):
    the same worker, so the same rows as the actors write."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.worker = ShardWorker(self.spec, self.store, self.images, self.profile, self.models)

    def run(self, pending: list[Shard], done: int, total: int, label: str) -> None:
        bar = progress_bar(self.spec, done, total, label, self.progress)
        for shard in pending:
            bar.update(self.worker.run(shard)["rows"])
        bar.close()


def progress_bar(spec: CampaignSpec, done: int, total: int, label: str, show: bool) -> tqdm:
    return tqdm(
        total=total,
        initial=done,
        unit="trial",
        unit_scale=True,
        disable=not show,
        desc=f"campaign {spec.name}{label}",
    )
