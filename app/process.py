"""This process's id, kept by a fork hook: what fork-aware state (metric files, Redis clients, onnxruntime sessions,
log lines) compares on the request path instead of a getpid() system call per use."""

import os

_pid = os.getpid()


def _forked() -> None:
    """Note the new process's id (os.register_at_fork, in the child)."""
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def pid() -> int:
    """This process's id, as read at its start or after its fork."""
    return _pid
