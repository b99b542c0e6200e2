"""asv benchmarks of lars_numba, one module per subject (see README, "Benchmarks").

The suite runs against every commit of the history, so a module takes from the
installed package only what it needs, and a benchmark whose subject a commit
lacks skips: ``NotImplementedError`` from ``setup``, or asv's
``SkipNotImplemented`` from one method where its peers in the class still run.
"""
