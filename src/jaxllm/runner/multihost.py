"""Several hosts: process 0 decides, every process runs the same device calls.

With ``jax.distributed`` a mesh spans the devices of several processes, and each jitted call on it
must be made by every process, in the same order, with the same inputs. Only process 0 runs the
engine (requests, scheduling, text). Before each device call its runner broadcasts the call —
kind, static arguments and input arrays — with ``multihost_utils.broadcast_one_to_all``; the
runners of the other processes wait in ``follow()`` and make the same call. A header of fixed size
goes first (JSON: kind, statics, the inputs' structure, shapes and dtypes), then the arrays.
"""

from __future__ import annotations

import json

import jax
import numpy as np

HEADER_BYTES = 16384


def spans_processes(mesh) -> bool:
    return len({d.process_index for d in mesh.devices.flat}) > 1


def _local(x):
    """A process-local view of a (replicated) result, so the host can read it."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x.addressable_data(0)
    return x


def local_tree(tree):
    return jax.tree.map(_local, tree)


class Mirror:
    """The broadcast channel between process 0's runner and the others'."""

    def __init__(self):
        from jax.experimental import multihost_utils

        self._bcast = multihost_utils.broadcast_one_to_all
        self.is_leader = jax.process_index() == 0

    def lead(self, kind: str, statics: dict, flags: dict, leaves: list) -> list:
        """Process 0: announce a call; returns the inputs as host arrays (what the others get)."""
        arrays = [np.asarray(x) for x in leaves]
        header = json.dumps({"kind": kind, "statics": statics, "flags": flags,
                             "shapes": [[list(a.shape), a.dtype.str] for a in arrays]}).encode()
        if len(header) > HEADER_BYTES:
            raise ValueError(f"call header over {HEADER_BYTES} bytes")
        buf = np.zeros(HEADER_BYTES, np.uint8)
        buf[: len(header)] = np.frombuffer(header, np.uint8)
        self._bcast(buf)
        if arrays:
            self._bcast(tuple(arrays))
        return arrays

    def wait(self) -> tuple[str, dict, dict, list]:
        """The other processes: the next call (kind "stop" ends the loop)."""
        buf = np.asarray(self._bcast(np.zeros(HEADER_BYTES, np.uint8)))
        header = json.loads(bytes(buf).rstrip(b"\0").decode())
        shapes = header["shapes"]
        arrays = []
        if shapes:
            got = self._bcast(tuple(np.zeros(s, np.dtype(d)) for s, d in shapes))
            arrays = [np.asarray(a) for a in got]
        return header["kind"], header["statics"], header["flags"], arrays
