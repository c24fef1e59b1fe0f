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


def test_two_gloo_ranks_free_an_all_gathers_buffers_before_the_rank_moves_on(tmp_path):
    """Real gloo: without the wait the worker still holds the output on return about half the time."""
    import subprocess
    import sys

    script = tmp_path / "ranks.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from memtui.engine.live.distributed import released_by_gloo\n"
        "dist.init_process_group('gloo')\n"
        "late = 0\n"
        "for _ in range(50):\n"
        "    inp, out = torch.ones(1 << 14), torch.empty(2 << 14)\n"
        "    before = (inp._use_count(), out._use_count())\n"
        "    released_by_gloo([out, inp], lambda: dist.all_gather_into_tensor(out, inp))\n"
        "    late += (inp._use_count(), out._use_count()) != before\n"
        "dist.destroy_process_group()\n"
        "assert late == 0, late\n"
    )
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
