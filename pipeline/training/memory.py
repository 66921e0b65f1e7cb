"""Keep freed memory for reuse instead of handing it back to the kernel after every layer.

On glibc, a buffer over the mmap threshold gets fresh pages from the kernel and returns them when freed, and
a heap whose free top exceeds the trim threshold is shrunk. With the defaults, the large activations of a CNN
are mapped, zero-filled page by page and unmapped again at every layer of every batch. Fixing the thresholds
(mmap at its 32 MiB maximum, trim at 2 GiB) makes the heap keep those pages: lite0's feature pass at 160 px in
bf16 on the 2-core CPU went from 300 to 400 img/s in its first batches, and training steps 5-15% faster. The
cost: a process's resident memory stays near its peak until it exits.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

# mallopt() parameters, from glibc's malloc.h. Setting either one also stops glibc's own adjustment of both.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 << 20  # glibc's upper limit for it on 64-bit machines
_TRIM_THRESHOLD = 2 << 30


def keep_freed_memory() -> bool:
    """Set the thresholds when the C library is glibc; True when they were set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries: no mallopt to tune
        return False
    done = (
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    )
    if not done:
        log.warning("memory: glibc refused the malloc thresholds; large tensors keep their default handling")
    return done
