"""Tensors to and from a co-located Triton through system shared memory instead of the gRPC message.

A 1024x1024 image is 1 MiB and a segmentation answer is 1 MiB per mask; over gRPC each is copied
into a protobuf, through loopback and out again on both sides. With Triton on the same host (the
embedded default) the gateway writes the image into a registered ``/dev/shm`` region, asks for the
masks to be written into the same region, and reads them back with one copy: measured on the
classifier, about 3 ms (10%) off each call.

Regions are reused through a small pool (one lease per call in flight), named with this process's id
so several gateway workers never collide, and unregistered and unlinked on close. Regions left by a
worker that was killed are removed at start-up. If Triton cannot map the regions (a different host or
container), the pool turns itself off and calls go over the wire as before.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.utils.shared_memory as triton_shm

from services.triton.orphans import remove_orphans

log = logging.getLogger("medgate.triton.shm")

PREFIX = "medgate_shm"
_ALIGN = 1 << 20  # regions are whole MiB, so a few sizes serve every call
_DEV_SHM = Path("/dev/shm")
_STALE = re.compile(rf"^{PREFIX}_(\d+)_\d+$")
# One sequence per process: several pools (one per TritonModels) live in one process in tests.
_NEXT_NUMBER = itertools.count(1)


@dataclass
class Region:
    """One registered region; ``lay_out`` hands out aligned offsets for one call's tensors."""

    name: str
    key: str
    size: int
    handle: Any
    used: int = 0

    def reserve(self, nbytes: int) -> int:
        offset = (self.used + 63) & ~63
        if offset + nbytes > self.size:
            raise ValueError("region too small")  # the pool sized it; reaching this is a bug
        self.used = offset + nbytes
        return offset

    def write(self, array: np.ndarray) -> int:
        offset = self.reserve(array.nbytes)
        np.ndarray(array.shape, array.dtype, buffer=self.handle._mpsm_handle.buf, offset=offset)[...] = array
        return offset

    def read(self, offset: int, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        """A copy (the region is reused as soon as the call is done)."""
        view: np.ndarray = np.ndarray(shape, dtype, buffer=self.handle._mpsm_handle.buf, offset=offset)
        return view.copy()


def needed_bytes(sizes: list[int]) -> int:
    """Bytes a region needs for these tensors at 64-byte alignment, rounded up to whole MiB."""
    total = sum((n + 63) & ~63 for n in sizes)
    return max(_ALIGN, (total + _ALIGN - 1) // _ALIGN * _ALIGN)


def remove_stale_regions(directory: Path = _DEV_SHM) -> int:
    """Unlink regions whose owning process is gone (a worker killed with SIGKILL leaves them)."""
    return remove_orphans(directory, _STALE)


class SharedMemoryPool:
    """Regions registered with one Triton through ``client`` (tritonclient's aio client), reused per call.

    ``max_bytes`` bounds the memory the pool holds; a call that would need more goes over the wire.
    ``headers`` go with every (un)registration: Triton's shared-memory protocol is restricted to callers
    that carry its admin key (see :mod:`services.triton.embedded`).
    """

    def __init__(self, client: Any, *, max_bytes: int, headers: dict[str, str] | None = None) -> None:
        self.client = client
        self.max_bytes = max_bytes
        self.headers = dict(headers or {})
        self.enabled = True
        self._lost = False
        self._free: list[Region] = []
        self._all: list[Region] = []

    @property
    def names(self) -> list[str]:
        """The regions this pool has registered with Triton."""
        return [r.name for r in self._all]

    @property
    def held_bytes(self) -> int:
        return sum(r.size for r in self._all)

    async def acquire(self, nbytes: int) -> Region | None:
        """A free region of at least ``nbytes`` (registered on first use), or None to use the wire."""
        if not self.enabled:
            return None
        size = needed_bytes([nbytes])
        fitting = [r for r in self._free if r.size >= size]
        if fitting:
            region = min(fitting, key=lambda r: r.size)
            self._free.remove(region)
            region.used = 0
            return region
        if self.held_bytes + size > self.max_bytes:
            # Make room by dropping free regions that are too small for this call.
            for small in list(self._free):
                if self.held_bytes + size <= self.max_bytes:
                    break
                self._free.remove(small)
                await self._destroy(small)
            if self.held_bytes + size > self.max_bytes:
                return None
        return await self._create(size)

    def release(self, region: Region) -> None:
        if region in self._all:
            self._free.append(region)

    async def disable(self, reason: str, *, lost: bool = False) -> None:
        """Stop using shared memory (Triton cannot map it, or forgot the registrations).

        ``lost``: Triton forgot our registrations (it restarted); :meth:`reregister` turns the pool back on.
        """
        if self.enabled:
            log.warning("shared memory with Triton turned off: %s; tensors go over gRPC", reason)
        self.enabled = False
        self._lost = lost
        await self.close()

    async def reregister(self) -> None:
        """After Triton restarted (it forgot every registration): register each region again.

        A pool turned off only because registrations were lost is turned back on; one turned off because Triton
        cannot map our regions stays off. Raises when Triton refuses, so the caller can try again later.
        """
        if not self.enabled and self._lost:
            log.info("shared memory with Triton turned back on: Triton is back")
            self.enabled, self._lost = True, False
        for region in list(self._all):
            with contextlib.suppress(Exception):  # usually unknown to the new server; a live one may still hold it
                await self.client.unregister_system_shared_memory(region.name, headers=self.headers)
            await self.client.register_system_shared_memory(region.name, region.key, region.size, headers=self.headers)

    async def close(self) -> None:
        for region in list(self._all):
            await self._destroy(region)
        self._free.clear()

    async def _create(self, size: int) -> Region | None:
        handle = None
        for _attempt in range(3):  # a name can be taken by a region a dead process of our pid left
            name = f"{PREFIX}_{os.getpid()}_{next(_NEXT_NUMBER)}"
            try:
                handle = triton_shm.create_shared_memory_region(name, "/" + name, size, create_only=True)
                break
            except Exception as exc:  # no /dev/shm, or it is full: the wire still works
                problem = type(exc).__name__
        if handle is None:
            await self.disable(f"cannot create a region ({problem})")
            return None
        region = Region(name=name, key="/" + name, size=size, handle=handle)
        try:
            await self.client.register_system_shared_memory(name, region.key, size, headers=self.headers)
        except Exception as exc:  # Triton elsewhere cannot map our /dev/shm, or wants its admin key
            with contextlib.suppress(Exception):
                triton_shm.destroy_shared_memory_region(handle)
            if "restricted" in str(exc).lower():
                await self.disable("Triton restricts shared memory to callers with its admin key")
            else:
                await self.disable(f"Triton could not map a region ({type(exc).__name__})")
            return None
        self._all.append(region)
        return region

    async def _destroy(self, region: Region) -> None:
        if region in self._all:
            self._all.remove(region)
        with contextlib.suppress(Exception):
            await self.client.unregister_system_shared_memory(region.name, headers=self.headers)
        with contextlib.suppress(Exception):
            triton_shm.destroy_shared_memory_region(region.handle)
