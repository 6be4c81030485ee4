"""Where a run's training batches come from: device-resident slices, or a stream from the cache.

Both sources yield the same batches in the same order: the per-epoch selection is
:class:`~avn_study.data.slices.EpochSampler`'s, chunked into ``batch_size`` like
``torch.utils.data.BatchSampler(drop_last=False)``, and the values are those of
:meth:`SliceDataset.__getitems__`. So a run gives the same numbers whichever source feeds it.

- :class:`ResidentBatches` materialises every slice of the fold once (image as float32, the two
  masks as bool) on the device and indexes it there: a step costs no host work and no copy.
- :class:`StreamedBatches` reads each batch from the memory-mapped cache in the training process
  (cheap on the CPU: well under a millisecond per slice); on CUDA a background thread reads and
  pins the next batches while the GPU trains on the current one.

:func:`batch_source` chooses: ``resident="auto"`` keeps the slices on a CUDA device when they fit in
``memory_fraction`` of its memory (and in what is free), and streams otherwise (and on the CPU,
where a resident copy would only duplicate the page cache in every trial).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Protocol

import torch

from avn_study.data.slices import EpochSampler, SliceDataset, make_loader
from avn_study.errors import AvnError

_MATERIALISE_CHUNK = 512  # slices read from the cache per copy to the device


class BatchSource(Protocol):
    kind: str  # "resident" | "streamed" | "prefetched": recorded in the run's provenance

    def set_epoch(self, epoch: int) -> None: ...

    @property
    def slices_per_epoch(self) -> int: ...

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]: ...

    def __len__(self) -> int: ...


def resident_bytes(dataset: SliceDataset) -> int:
    """Device memory the fold's slices take when resident."""
    return len(dataset) * dataset.config.size**2 * (4 * dataset.n_channels + 2)


def _batch_count(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


class ResidentBatches:
    """Every training slice of the fold on ``device``; batches are gathered there by index."""

    kind = "resident"

    def __init__(self, dataset: SliceDataset, batch_size: int, seed: int, device: torch.device) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size=}")
        self.sampler = EpochSampler(dataset, seed=seed)
        self.batch_size, self.device = batch_size, device
        n, size = len(dataset), dataset.config.size
        self.image = torch.empty((n, dataset.n_channels, size, size), dtype=torch.float32, device=device)
        self.seg = torch.empty((n, 1, size, size), dtype=torch.bool, device=device)
        self.loc = torch.empty((n, 1, size, size), dtype=torch.bool, device=device)
        for start in range(0, n, _MATERIALISE_CHUNK):
            chunk = dataset.__getitems__(list(range(start, min(n, start + _MATERIALISE_CHUNK))))
            stop = start + chunk["image"].shape[0]
            self.image[start:stop] = chunk["image"].to(device)
            self.seg[start:stop] = chunk["seg"].to(device) > 0.5
            self.loc[start:stop] = chunk["loc"].to(device) > 0.5

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    @property
    def slices_per_epoch(self) -> int:
        return len(self.sampler)

    def __len__(self) -> int:
        return _batch_count(len(self.sampler), self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = torch.from_numpy(self.sampler.indices()).to(self.device)
        for start in range(0, order.numel(), self.batch_size):
            index = order[start : start + self.batch_size]
            image = self.image[index]
            yield {"image": image, "seg": self.seg[index].float(), "loc": self.loc[index].float(), "recon": image}


class StreamedBatches:
    """Batches read from the cache in the sampled order (on CUDA, read ahead and pinned by a thread)."""

    def __init__(self, dataset: SliceDataset, batch_size: int, seed: int, prefetch: int = 0) -> None:
        self.loader = make_loader(dataset, batch_size=batch_size, seed=seed)
        self.prefetch = prefetch
        self.kind = "prefetched" if prefetch else "streamed"

    def set_epoch(self, epoch: int) -> None:
        self.loader.batch_sampler.sampler.set_epoch(epoch)

    @property
    def slices_per_epoch(self) -> int:
        return len(self.loader.batch_sampler.sampler)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if not self.prefetch:
            return iter(self.loader)
        return _read_ahead(self.loader, self.prefetch, pin=torch.cuda.is_available())


def _read_ahead(loader, depth: int, pin: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Iterate ``loader`` in a thread, ``depth`` batches ahead (``pin``: in page-locked memory, for async copies)."""
    done = object()
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def read() -> None:
        try:
            for batch in loader:
                item = {k: v.pin_memory() for k, v in batch.items()} if pin else batch
                while not stop.is_set():
                    try:
                        slots.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put(done)
        except BaseException as err:  # handed to the training thread, raised there
            slots.put(err)

    reader = threading.Thread(target=read, name="avn-batch-reader", daemon=True)
    reader.start()
    try:
        while (item := slots.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while reader.is_alive():  # unblock a reader waiting on a full queue, then let it end
            try:
                slots.get_nowait()
            except queue.Empty:
                reader.join(timeout=0.1)


def batch_source(
    dataset: SliceDataset,
    *,
    batch_size: int,
    seed: int,
    device: torch.device,
    resident: str = "auto",
    memory_fraction: float = 0.25,
) -> BatchSource:
    """The run's training batches (see the module docstring for how the source is chosen).

    Raises:
        AvnError: ``resident="on"`` on a CUDA device whose free memory cannot hold the slices.
    """
    need = resident_bytes(dataset)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        fits = need <= min(memory_fraction * total, 0.9 * free)
        if resident == "on" and need > 0.9 * free:
            raise AvnError(
                f"resident=on: the fold's {len(dataset)} training slices need {need / 2**20:.0f} MiB on "
                f"{device}, which has {free / 2**20:.0f} MiB free (use resident=auto to stream instead)"
            )
        if resident == "on" or (resident == "auto" and fits):
            return ResidentBatches(dataset, batch_size, seed, device)
        return StreamedBatches(dataset, batch_size, seed, prefetch=2)
    if resident == "on":
        return ResidentBatches(dataset, batch_size, seed, device)
    return StreamedBatches(dataset, batch_size, seed)
