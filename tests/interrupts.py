"""Child processes that a test interrupts as a user would, with Ctrl-C (SIGINT)."""

import signal


def sigint_at_default() -> None:
    """``preexec_fn`` of a child a test sends SIGINT: SIGINT back at its default action, so the child's Python turns it
    into KeyboardInterrupt. Without it a test fails wherever pytest itself runs with SIGINT ignored (a shell's
    background job, ``pytest ... &``): its children inherit the ignoring, and Python then installs no handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
