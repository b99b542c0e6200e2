"""Import and first ``scale`` call in a new process: the compile cost a user pays."""

from __future__ import annotations

import shutil
import tempfile

from ._support import optional, require

bench = optional("lars_numba.bench")


class FirstCall:
    """Seconds for ``import lars_numba`` and one ``scale`` call in a new process.

    ``cold``: an empty Numba cache, so the kernels compile; ``warm``: the cache
    a previous process left, as every later run of a program finds it.
    """

    params = (["cold", "warm"],)
    param_names = ("cache",)

    def setup(self, cache):
        self.first_call_seconds = require(bench, "first_call_seconds")
        self.cache_dir = tempfile.mkdtemp(prefix="lars_numba_cache_")
        if cache == "warm":
            self.first_call_seconds(self.cache_dir)

    def teardown(self, cache):
        # asv tears down after a setup that skipped, before cache_dir was made.
        if hasattr(self, "cache_dir"):
            shutil.rmtree(self.cache_dir, ignore_errors=True)

    def track_import_and_first_call(self, cache):
        if cache == "cold":
            # A directory of its own, which no other call has filled.
            with tempfile.TemporaryDirectory(dir=self.cache_dir) as empty:
                return self.first_call_seconds(empty)
        return self.first_call_seconds(self.cache_dir)

    track_import_and_first_call.unit = "seconds"
