"""training/memory: glibc malloc thresholds."""

from __future__ import annotations

import platform
import sys

from pipeline.training.memory import keep_freed_memory


def test_freed_memory_is_kept_where_the_c_library_is_glibc():
    assert keep_freed_memory() == (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc")
