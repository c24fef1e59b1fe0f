"""A CPU multi-rank run frees collective buffers where CUDA does, not when gloo's thread gets round to it."""

import threading
import time

import torch

from memtui.engine.live.distributed import released_by_gloo


def test_the_rank_resumes_only_after_the_backend_thread_lets_go_of_the_tensors():
    buffer = torch.empty(1024)
    released = threading.Event()

    def collective():
        held = [buffer.view(2, 512)]  # ProcessGroupGloo's worker keeps views after marking the work complete

        def worker():
            time.sleep(0.05)
            held.clear()
            released.set()

        threading.Thread(target=worker).start()
        return "done"

    assert released_by_gloo([buffer, buffer[:10]], collective) == "done"
    assert released.is_set()


def test_a_backend_that_never_lets_go_costs_at_most_the_timeout(monkeypatch):
    monkeypatch.setattr("memtui.engine.live.distributed.GLOO_RELEASE_TIMEOUT_S", 0.05)
    buffer = torch.empty(16)
    kept = []
    began = time.monotonic()
    released_by_gloo([buffer], lambda: kept.append(buffer))
    assert time.monotonic() - began < 1.0

