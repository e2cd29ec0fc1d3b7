"""Starting and stopping the samples' processes: a free port, waiting for a listener,
stopping a child (used by the sample servers and by the tests that start their own)."""

from __future__ import annotations

import socket


def wait_listening(port: int, proc, what: str, log, timeout: float = 20) -> None:
    """Return once 127.0.0.1:`port` accepts connections; RuntimeError (with `log()`) if
    `proc` exits first or it takes longer than `timeout`."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not start:\n{log()}")


def stop_process(proc) -> None:
    """Terminate a child process, killing it if it does not stop within 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except Exception:  # subprocess.TimeoutExpired
        proc.kill()
        proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
