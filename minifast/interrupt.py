"""Ctrl-C during a fit: the first press is deferred to the next batch boundary, where the learner is consistent and a
Checkpoint can save the point; a second press interrupts at once."""
import contextlib
import signal
import threading

__all__ = ['DeferredInterrupt']


class DeferredInterrupt:
    """`requested` becomes True at the first Ctrl-C while `deferring()`; the loop raises KeyboardInterrupt at the next
    batch boundary and records which one in `boundary` ('train': after a training batch, 'valid': in the epoch's
    validation, after its training; None: no resumable point)."""

    def __init__(self):
        self.requested, self.boundary = False, None

    @contextlib.contextmanager
    def deferring(self):
        """While fitting in the main thread, a first Ctrl-C only sets `requested`."""
        self.requested = False
        if (threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
            yield  # another handler is in charge (or a nested fit): leave it alone
            return

        def defer(signum, frame):
            self.requested = True
            signal.signal(signal.SIGINT, signal.default_int_handler)

        signal.signal(signal.SIGINT, defer)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def stop_here(self, boundary):
        """Turn a deferred Ctrl-C into KeyboardInterrupt now, at `boundary`."""
        self.requested, self.boundary = False, boundary
        raise KeyboardInterrupt
