"""The scale case's watched child: its peak RSS survives the suite worker that reports it."""

import json
import sys

from benchmarks import scale, workers

GROW = "x = bytearray(300 * 2**20); x[::4096] = b'1' * len(x[::4096]); import time; time.sleep(1.0)"


def test_a_watched_childs_peak_is_the_workers_reported_peak(monkeypatch, capsys):
    """A worker's result carries the larger of its own peak and ``child_peak_mib``: the watched child's
    300 MiB must come out as the result's ``peak_rss_mib``, not the worker's own smaller figure."""
    monkeypatch.setitem(workers.WORKERS, "watched", lambda spec: scale.watch([sys.executable, "-c", GROW]))
    assert workers.main(["workers", json.dumps({"worker": "watched", "threads": 1})]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("RESULT "))
    got = json.loads(line[len("RESULT "):])
    # the worker here is pytest itself, whose own peak may be larger still: the result is the larger of the two
    assert got["rc"] == 0 and got["child_peak_mib"] >= 300 and got["peak_rss_mib"] >= got["child_peak_mib"]
