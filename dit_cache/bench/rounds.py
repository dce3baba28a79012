"""The peer benchmark's measurement rounds: every candidate once per input, interleaved, in one process or in
several forked workers of one torch thread each.

A worker does the whole protocol on its share of the inputs: one untimed warm-up call per candidate, each followed
by the restoration checks (the transformer structurally stock, and an uncached call bitwise the reference image),
then the timed rounds (per input every candidate once, in an order rotated per input), then a last bitwise check.
Every time ratio is taken within one worker, between calls made on the same core under the same load, so two
workers on a 2-core machine halve the run time without mixing timings (docs/benchmark.md measures it).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import queue
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch

from .speed import collector_paused


class RestorationError(RuntimeError):
    """A candidate's removal did not leave the stock model: the run is not reported."""


class WorkerFailure(RuntimeError):
    """The traceback of an error raised in a benchmark worker process (the ``__cause__`` of the re-raised one)."""


def first_sample(output):
    """The first image of an image pipeline's output, or the first video (its frames) of a video pipeline's."""
    samples = getattr(output, "images", None)
    if samples is None:
        samples = getattr(output, "frames", None)
    if samples is None:
        raise TypeError(f"{type(output).__name__} has neither images nor frames: the bench scores image and video "
                        f"pipelines' outputs.")
    return samples[0]


def check_restored(pipe, signature, label: str) -> None:
    from .peers import module_signature

    if module_signature(pipe.transformer) != signature:
        raise RestorationError(f"removing {label} left hooks or an instance forward on the transformer.")


def default_workers(threads: int = 1) -> int:
    """Two single-thread workers where there are two CPUs per worker thread and processes can fork, else one.

    Two is what docs/benchmark.md checked against one worker; more share the memory bandwidth further.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 2 if cpus >= 2 * threads and can_fork() else 1


def can_fork() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()


@dataclass
class Rounds:
    """What a measurement needs: the pipeline with its candidates, the benchmark setup (``left_out`` is filled
    here) and meter, and ``call(index)``, the pipeline keyword arguments of input ``index``."""

    pipe: object
    candidates: list
    setup: object
    unit_flops: torch.Tensor
    call: Callable[[int], dict]
    count: int
    threads: int = 1

    def calls_per_worker(self) -> int:
        """Untimed calls of one worker: the reference, a warm-up and a check per candidate, the last check."""
        return 2 * len(self.candidates)


def measure(rounds: Rounds, workers: int, tick: Callable[[], None]) -> tuple[list, dict]:
    """Run the rounds on ``workers`` processes (1: this one); ``tick()`` after every pipeline call.

    Returns the candidates that ran and ``records[label] = {"images", "seconds", "counts"}``, lists by input.
    """
    inputs = list(range(rounds.count))
    workers = min(workers, rounds.count)
    # The loaded pipeline's objects out of every later collection (the collections between calls scan only what
    # the calls make) and, before forking, left unscanned so the workers do not copy their pages.
    gc.collect()
    gc.freeze()
    try:
        if workers == 1:
            shares = [_measure_share(rounds, inputs, tick)]
        else:
            shares = _in_workers(rounds, [inputs[w::workers] for w in range(workers)], tick)
    finally:
        gc.unfreeze()
    return _merge(rounds, shares)


def _measure_share(rounds: Rounds, indices: list[int], tick: Callable[[], None]) -> dict:
    import numpy as np

    from . import peers

    pipe, meter, setup = rounds.pipe, rounds.setup.meter, rounds.setup
    signature = peers.module_signature(pipe.transformer)

    def generate(candidate, index: int):
        meter.reset()
        candidate.apply(pipe)
        try:
            with candidate.call_context(pipe), collector_paused():
                start = time.perf_counter()
                image = first_sample(pipe(**rounds.call(index)))
                seconds = time.perf_counter() - start
            stats = getattr(pipe, "cache_stats", None)
            counts = {"cache_ratio": meter.cache_ratio(),
                      "skipped_flop_share": meter.skipped_flop_share(rounds.unit_flops),
                      "engine_cache_ratio": None if stats is None else stats.cache_ratio}
        finally:
            candidate.remove(pipe)
        check_restored(pipe, signature, candidate.label)
        tick()
        return image, seconds, counts

    def check_bitwise(label: str) -> None:
        image, _, _ = generate(peers.UNCACHED, 0)
        if not np.array_equal(image, reference):
            raise RestorationError(f"after removing {label}, the uncached image is not bitwise the reference.")

    reference, _, _ = generate(peers.UNCACHED, 0)
    for candidate in rounds.candidates[1:]:
        if candidate.family in setup.left_out:
            continue
        try:
            generate(candidate, 0)
        except RestorationError:
            raise
        except Exception as error:
            if candidate.group != "diffusers":
                raise
            # A diffusers hook that does not support this model's blocks: reported, not crashed on. Its removal
            # (again, if applying it failed halfway) must still leave the stock model.
            candidate.remove(pipe)
            check_restored(pipe, signature, candidate.label)
            setup.leave_out(candidate.family, peers.describe_failure(candidate.label, pipe, error))
        check_bitwise(candidate.label)
    candidates = [c for c in rounds.candidates if c.family not in setup.left_out]
    if len(candidates) == 1:
        raise ValueError(f"no configuration runs on {type(pipe).__name__}: {peers.format_left_out(setup.left_out)}")
    measured = {c.label: {} for c in candidates}
    for index in indices:
        shift = index % len(candidates)
        for candidate in candidates[shift:] + candidates[:shift]:
            measured[candidate.label][index] = generate(candidate, index)
    check_bitwise("the last configuration")
    return {"measured": measured, "left_out": dict(setup.left_out), "reference": reference}


def _merge(rounds: Rounds, shares: list[dict]) -> tuple[list, dict]:
    import numpy as np

    for share in shares:
        rounds.setup.left_out.update(share["left_out"])
    reference = shares[0]["reference"]
    if any(not np.array_equal(share["reference"], reference) for share in shares[1:]):
        raise RestorationError("the uncached image of the first input differs between benchmark workers.")
    candidates = [c for c in rounds.candidates if c.family not in rounds.setup.left_out]
    records = {}
    for candidate in candidates:
        by_index = {index: result for share in shares for index, result in share["measured"][candidate.label].items()}
        images, seconds, counts = zip(*(by_index[index] for index in range(rounds.count)))
        records[candidate.label] = {"images": list(images), "seconds": list(seconds), "counts": list(counts)}
    if not np.array_equal(records["uncached"]["images"][0], reference):
        raise RestorationError("the uncached image of the first input changed between warm-up and scoring.")
    return candidates, records


def _in_workers(rounds: Rounds, shares: list[list[int]], tick: Callable[[], None]) -> list[dict]:
    """Each share on its own forked process; errors re-raised here with the worker's traceback as the cause."""
    context = multiprocessing.get_context("fork")  # the pipeline and candidates are shared as they are, unpickled
    messages = context.Queue()
    processes = [context.Process(target=_worker, args=(rounds, share, messages, number), daemon=True)
                 for number, share in enumerate(shares)]
    results, silent_exits = {}, 0
    try:
        for process in processes:
            process.start()
        while len(results) < len(processes):
            try:
                kind, number, payload = messages.get(timeout=1.0)
            except queue.Empty:
                gone = [n for n, p in enumerate(processes) if n not in results and p.exitcode is not None]
                # A worker's last message is in the pipe before it exits: give it a few reads to arrive.
                silent_exits = silent_exits + 1 if gone else 0
                if silent_exits > 3:
                    raise RuntimeError(f"benchmark worker {gone[0]} exited (code {processes[gone[0]].exitcode}) "
                                       f"without a result; rerun with --workers 1 to see the error here.") from None
                continue
            if kind == "tick":
                tick()
            elif kind == "done":
                results[number] = payload
            else:
                error, trace = payload
                raise error from WorkerFailure(f"in benchmark worker {number}:\n{trace}")
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join()
    return [results[number] for number in range(len(processes))]


def _worker(rounds: Rounds, share: list[int], messages, number: int) -> None:
    torch.set_num_threads(rounds.threads)
    try:
        result = _measure_share(rounds, share, lambda: messages.put(("tick", number, None)))
    except BaseException as error:
        messages.put(("error", number, (_portable(error), traceback.format_exc())))
        return
    messages.put(("done", number, result))


def _portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling (its type reaches the caller), else a RuntimeError with its text."""
    try:
        return pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
