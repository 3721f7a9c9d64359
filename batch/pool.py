"""Decoding processes: paths in, batches of uint8 crops out as they are done; a crash costs one file.

Why not torch's DataLoader: when one of its workers dies (a native fault in a codec library, the
out-of-memory killer taking a worker that swelled on one huge file), the whole run fails with
"DataLoader worker ... killed by signal", raised from a SIGCHLD handler wherever the main process
happens to be, and the next run meets the same file and dies the same way: the shard never finishes.

Here each worker has its own pipe and its own slots of shared memory, and writes the index of the file
it is decoding into a shared array before it starts on it. When a worker dies, that file gets an error
row naming how (`decoder crashed: killed by SIGSEGV ...`), the worker's unfinished batches go to a
fresh worker without it, and nothing else in the run notices. A worker that spends longer than the
timeout on one file (a codec in an endless loop) is killed the same way: `decoder hung: ...`. Pixels never travel through the pipe:
the worker writes them into its slot of memory shared with the main process (anonymous, not a file in
/dev/shm) and sends the per-file outcomes (errors, sizes) alone. With `jpeg_bytes` (--decode gpu), a
second slot of that many bytes per batch holds the checked JPEGs the device decodes; a file that does
not fit in what is left of it is decoded by the worker.
"""

from __future__ import annotations

import logging
import math
import mmap
import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import numpy as np
import torch

from batch import transient
from batch.decode import Decoded, Preprocess, decode
from batch.manifest import Found
from batch.stopping import ignore_stop_signals

log = logging.getLogger(__name__)

SLOTS = 2  # batches a worker holds at once: one it decodes, one done and waiting to be taken
IDLE = -1  # a worker's entry in `current` between files
HANG_CHECK_SECONDS = 1.0  # how often the main process looks for a worker past --decode-timeout
WATCHDOG_SECONDS = 1.0  # how often an idle worker checks that the main process still lives
DEATHS_BETWEEN_FILES = 3  # a worker that keeps dying while on no file is a broken machine, not a bad file


@dataclass
class Batch:
    """Valid until the next batch is asked for: its pixels and JPEG bytes lie in a worker's slots."""

    items: list[Decoded]  # every file of the batch, in order; pixels travel in `pixels` only
    pixels: torch.Tensor | None  # uint8 (n, h, w, 3), the items decoded by the workers, in order


@dataclass
class _Task:
    number: int  # the batch's place in the run
    slot: int
    indices: list[int]
    crashed: list[Decoded] = field(default_factory=list)  # files whose decoder died, answered here


@dataclass
class _Worker:
    process: BaseProcess
    connection: Connection
    tasks: list[_Task]  # sent and not yet answered, in the order the worker takes them
    done: dict[int, tuple[_Task, list[Decoded]]] = field(default_factory=dict)  # answered, by slot


class DecodePool:
    """`workers` decoding processes, started at once so they work while the model loads. With no
    workers, files are decoded in this process when a batch is asked for, without isolation.

    Batches come out as they are done, not in order: a worker stuck on one slow file holds back its
    own batches only, while the others go on. A batch's pixels lie in its worker's slot, which is
    handed out again once the next batch is asked for; with `pin`, the slots are page-locked once, so
    the GPU copies from them directly."""

    def __init__(self, paths: list[str], preprocess: Preprocess, batch_size: int, workers: int, pin: bool,
                 timeout: float = 300.0, members: dict[str, Found] | None = None,
                 retries: int = transient.DEFAULT_RETRIES, jpeg_bytes: int = 0):  # fmt: skip
        self.paths, self.preprocess, self.pin, self.timeout = paths, preprocess, pin, timeout
        self.jpeg_bytes = jpeg_bytes  # room per batch for JPEGs left to the device; 0: the workers decode all
        self.retries = retries  # of a read that fails for a moment (batch.transient)
        self.members = members or {}  # where the packed inputs lie; the workers inherit it
        self.batch_size, self.count = batch_size, math.ceil(len(paths) / batch_size)
        shape = (workers, SLOTS, batch_size, preprocess.crop, preprocess.crop, 3)
        # Anonymous shared memory, inherited by every worker forked later: no file in /dev/shm, whose
        # size a container caps at 64 MB and which answers an overfull write with SIGBUS.
        self.memory = mmap.mmap(-1, max(math.prod(shape), 1))
        self.slots = torch.frombuffer(self.memory, dtype=torch.uint8)[: math.prod(shape)].view(shape)
        jpeg_shape = (workers, SLOTS, jpeg_bytes)
        self.jpeg_memory = mmap.mmap(-1, max(math.prod(jpeg_shape), 1))  # touched only as far as filled
        self.jpegs = np.ndarray(jpeg_shape, dtype=np.uint8, buffer=self.jpeg_memory)
        self.page_locked = pin and workers > 0 and page_lock(self.slots)
        self.current = multiprocessing.get_context("fork").Array("q", [IDLE] * workers, lock=False)
        self.since = multiprocessing.get_context("fork").Array("d", workers, lock=False)  # when it began that file
        self.killed: set[int] = set()  # workers this pool killed for overrunning the timeout
        self.sent = 0  # batches handed to workers so far
        self.lent: tuple[int, int] | None = None  # (worker, slot) of the batch last given out
        self.hang_checked = time.monotonic()
        self.deaths_between_files = 0
        self.workers = [self._start(number, []) for number in range(workers)]
        self._fill()

    def __iter__(self) -> Iterator[Batch]:
        if not self.workers:
            yield from self._decode_here()
            return
        for _ in range(self.count):
            place, task, items = self._next_answer()
            good = int(sum(item.error is None and item.jpeg_span is None for item in items))
            for item in items:
                if item.jpeg_span is not None:
                    start, stop = item.jpeg_span
                    item.jpeg, item.jpeg_span = self.jpegs[place, task.slot, start:stop], None
            pixels = self.slots[place, task.slot, :good] if good else None
            if pixels is not None and self.pin and not self.page_locked:
                pixels = pixels.pin_memory()  # a copy: the slot is free at once
            else:
                self.lent = (place, task.slot)
            yield Batch(sorted(items + task.crashed, key=lambda item: item.index), pixels)
            self.lent = None
            self._fill()

    def _decode_here(self) -> Iterator[Batch]:
        for number in range(self.count):
            items, room = [], self.jpeg_bytes
            for index in self._indices(number):
                items.append(decode(index, self.paths[index], self.preprocess, self.members.get(self.paths[index]),
                                    self.retries, jpeg_room=room))  # fmt: skip
                room -= len(items[-1].jpeg) if items[-1].jpeg is not None else 0
            good = [item.pixels for item in items if item.pixels is not None]
            for item in items:
                item.pixels = None
            pixels = torch.from_numpy(np.stack(good)) if good else None
            yield Batch(items, pixels.pin_memory() if self.pin and pixels is not None else pixels)

    def _indices(self, number: int) -> list[int]:
        """Batch `number`'s files, as positions in `paths`."""
        return list(range(number * self.batch_size, min((number + 1) * self.batch_size, len(self.paths))))

    def close(self) -> None:
        for worker in self.workers:
            try:
                worker.connection.send(None)
            except OSError:
                pass  # already dead
        for worker in self.workers:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.connection.close()
        if self.page_locked:
            torch.cuda.cudart().cudaHostUnregister(self.slots.data_ptr())
            self.page_locked = False

    def _free_slots(self, place: int) -> list[int]:
        worker = self.workers[place]
        busy = {task.slot for task in worker.tasks} | set(worker.done)
        if self.lent is not None and self.lent[0] == place:
            busy.add(self.lent[1])
        return [slot for slot in range(SLOTS) if slot not in busy]

    def _fill(self) -> None:
        """Hand out batches in order, each to the worker with a free slot that has the least to do."""
        while self.sent < self.count:
            places = [place for place in range(len(self.workers)) if self._free_slots(place)]
            if not places:
                return
            place = min(places, key=lambda place: len(self.workers[place].tasks))
            task = _Task(self.sent, self._free_slots(place)[0], self._indices(self.sent))
            self.workers[place].tasks.append(task)
            self._send(self.workers[place], task)
            self.sent += 1

    def _next_answer(self) -> tuple[int, _Task, list[Decoded]]:
        """The earliest batch some worker has finished, waiting for one; a worker that died is replaced."""
        while True:
            done = [(task.number, place, slot) for place, worker in enumerate(self.workers)
                    for slot, (task, _items) in worker.done.items()]  # fmt: skip
            if done:
                _number, place, slot = min(done)
                task, items = self.workers[place].done.pop(slot)
                return place, task, items
            waiting = [handle for worker in self.workers for handle in (worker.connection, worker.process.sentinel)]
            ready = wait(waiting, timeout=min(self.timeout, HANG_CHECK_SECONDS))
            for place, worker in enumerate(self.workers):
                if worker.connection in ready and self._receive(worker):
                    continue
                if worker.process.sentinel in ready or not worker.process.is_alive():
                    self._replace(place)
            if time.monotonic() - self.hang_checked >= HANG_CHECK_SECONDS:
                self.hang_checked = time.monotonic()
                for place in range(len(self.workers)):
                    self._kill_if_hung(place)

    def _kill_if_hung(self, place: int) -> None:
        """A codec caught in an endless loop would stall the shard until the time limit, and again after
        every requeue: past the timeout its worker is killed, and its file gets the error row."""
        if self.current[place] != IDLE and time.monotonic() - self.since[place] > self.timeout:
            self.killed.add(place)
            self.workers[place].process.kill()

    def _receive(self, worker: _Worker) -> bool:
        try:
            slot, items = worker.connection.recv()
        except (EOFError, OSError):
            return False  # the worker died mid-message: its sentinel tells
        task = worker.tasks.pop(0)
        assert task.slot == slot, "a worker answers its tasks in order"
        worker.done[slot] = (task, items)
        return True

    def _replace(self, number: int) -> None:
        """Fail the file the dead worker was on, and give its unanswered batches to a fresh worker."""
        dead = self.workers[number]
        dead.process.join()
        hung = number in self.killed
        self.killed.discard(number)
        how = f"no answer in {self.timeout:g} s, killed" if hung else _how_it_died(dead.process.exitcode)
        culprit = self.current[number]
        task = next((task for task in dead.tasks if culprit in task.indices), None)
        if task is None:
            self.deaths_between_files += 1
            if self.deaths_between_files >= DEATHS_BETWEEN_FILES:
                raise RuntimeError(f"decoding workers died {self.deaths_between_files} times between files, last {how}: "
                                   "check the node's memory")
            log.warning("a decoding worker died between files (%s); a new one takes over", how)
        else:
            task.indices.remove(culprit)
            task.crashed.append(Decoded(culprit, error=f"decoder {'hung' if hung else 'crashed'}: {how}"))
            log.warning("the decoder died on %s (%s); that file gets an error row, a new worker takes over", self.paths[culprit], how)
        dead.connection.close()
        self.current[number] = IDLE
        fresh = self._start(number, dead.tasks)
        fresh.done = dead.done
        self.workers[number] = fresh
        for task in fresh.tasks:
            self._send(fresh, task)

    def _start(self, number: int, tasks: list[_Task]) -> _Worker:
        ours, theirs = multiprocessing.get_context("fork").Pipe()
        process = multiprocessing.get_context("fork").Process(
            target=_work, args=(number, theirs, self.slots[number], self.jpegs[number], self.current, self.since,
                  self.paths, self.members, self.preprocess, self.retries),
            name=f"batch-decode-{number}", daemon=True,
        )  # fmt: skip
        process.start()
        theirs.close()
        return _Worker(process, ours, tasks)

    @staticmethod
    def _send(worker: _Worker, task: _Task) -> None:
        try:
            worker.connection.send((task.slot, task.indices))
        except OSError:
            pass  # died already: `_next_answer` sees the sentinel and resends to its successor


def _work(number: int, connection: Connection, slots: torch.Tensor, jpegs: np.ndarray, current: Any, since: Any,
          paths: list[str], members: dict[str, Found], preprocess: Preprocess, retries: int) -> None:  # fmt: skip
    """A worker's life: decode the files of each batch it is sent into its slot (or copy the JPEGs left to
    the device into its JPEG slot), answer, repeat."""
    ignore_stop_signals()
    torch.set_num_threads(1)
    parent = os.getppid()

    def sleep_off_the_clock(seconds: float) -> None:
        """A wait before a read is tried again is no hang: --decode-timeout times each try."""
        since[number] = time.monotonic() + seconds
        time.sleep(seconds)

    while True:
        while not connection.poll(WATCHDOG_SECONDS):
            if os.getppid() != parent:
                return  # the main process was killed; its end of the pipe lives on in our siblings
        try:
            task = connection.recv()
        except EOFError:
            return  # the main process is gone
        if task is None:
            return
        slot, indices = task
        items, good, used = [], 0, 0
        for index in indices:
            since[number] = time.monotonic()  # before `current`: the main process reads them the other way round
            current[number] = index
            item = decode(index, paths[index], preprocess, members.get(paths[index]), retries, sleep_off_the_clock,
                          jpeg_room=jpegs.shape[-1] - used)  # fmt: skip
            if item.pixels is not None:
                slots[slot, good].numpy()[...] = item.pixels
                item.pixels = None
                good += 1
            if item.jpeg is not None:
                end = used + len(item.jpeg)
                jpegs[slot, used:end] = item.jpeg
                item.jpeg, item.jpeg_span, used = None, (used, end), end
            items.append(item)
        current[number] = IDLE
        connection.send((slot, items))


def page_lock(memory: torch.Tensor) -> bool:
    """Register memory with CUDA as page-locked, so the GPU copies straight from it (no staging copy,
    and the copy runs beside the CPU); False, said once, where the driver refuses."""
    try:
        refused = int(torch.cuda.cudart().cudaHostRegister(memory.data_ptr(), memory.numel(), 0))
    except Exception as error:  # noqa: BLE001 - no CUDA runtime in this torch, or none usable
        refused, why = -1, str(error)
    else:
        why = f"cudaHostRegister said {refused}"
    if refused:
        log.info("decoded batches are copied once more on their way to the GPU: their shared memory "
                 "could not be page-locked (%s)", why)  # fmt: skip
    return not refused


def _how_it_died(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = "; out of memory?" if -exitcode == signal.SIGKILL else ""
        return f"killed by {name} ({signal.strsignal(-exitcode)}{hint})"
    return f"its process exited with status {exitcode}"
