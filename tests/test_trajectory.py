"""The run directory's background writer."""

import threading

import pytest

from geobench.rundir import BackgroundWriter


def test_background_writer_keeps_order_bounds_what_waits_and_reports_errors():
    gate, log = threading.Event(), []
    writer = BackgroundWriter(depth=1)
    writer.submit(lambda: gate.wait() and log.append(1))  # the writer thread holds this one
    writer.submit(lambda: log.append(2))                   # this one waits in the queue
    assert writer.jobs.full()  # a third submit would block the trainer: copies cannot pile up
    gate.set()
    writer.flush()
    assert log == [1, 2]

    def broken():
        raise OSError("disk full")

    writer.submit(broken)
    with pytest.raises(OSError, match="disk full"):
        writer.flush()
    writer.close()
    assert not writer.thread.is_alive()
