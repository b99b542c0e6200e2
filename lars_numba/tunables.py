"""The engines' tunables, in one place: read at every call, so they may be changed.

Each name has one meaning. None of them changes what is computed, except
:data:`CPU_CHUNK`, which also fixes the order in which the CPU adds up a
pair's sums (see :doc:`/numerics`): change it and the rates may move by an
ulp, but they stay independent of the thread count.

Examples
--------
>>> from lars_numba import tunables
>>> tunables.PARALLEL_MIN_SIZE
65536
"""

from numba.core import config

# -- the CPU engine ------------------------------------------------------------

#: Elements of a pair that make one task of the CPU engine and one partial sum.
#: Large enough that a task outlasts its scheduling, small enough that a
#: float32 pair's chunk (512 KiB) stays in a core's L2 cache between the two
#: passes. Partial sums are added in chunk order, whatever thread took them.
CPU_CHUNK = 1 << 16

#: Pairs of fewer elements (all pairs together, for ``scale_all``) run on one
#: thread: below it, waking the thread pool costs more than it saves
#: (``python -m lars_numba bench --cutoff`` measures it).
PARALLEL_MIN_SIZE = 1 << 16

#: Bytes of the pairs that ``scale_all`` takes through both passes before it
#: moves on: half of a 32 MiB last-level cache, so that the second pass finds
#: them there.
CPU_BATCH_BYTES = 16 << 20

#: From this many arrays on, their ids (their objects' addresses, which the
#: compiled checks read them from) are read out of a NumPy array of the
#: objects in one compiled call: one ``id()`` each makes a Python int, about
#: 55 ns, more than that call costs past a few dozen arrays.
IDS_FROM_OBJECTS = 32

# -- the GPU engine ------------------------------------------------------------
#
# Under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), which runs a
# Python thread per GPU thread, the grid is the smallest the kernels allow,
# one block of one thread, so that a call on a few thousand elements returns
# in a fraction of a second; the results are the same on any grid.

_SIMULATOR = bool(config.ENABLE_CUDASIM)

#: Threads per block, 256 (1 under the simulator); a power of two, which the
#: block reduction halves.
THREADS_PER_BLOCK = 1 if _SIMULATOR else 256

#: Fewest blocks per launch, 128 (1 under the simulator). numba-cuda warns
#: below 128 blocks, and a single wave of mostly idle blocks costs a GPU no
#: more time than one block.
MIN_BLOCKS = 1 if _SIMULATOR else 128

#: Most blocks per launch, 1024 (1 under the simulator): 4 blocks of 256
#: threads on each of an H100's 132 SMs keep enough loads in flight to stream
#: from HBM at full speed, with a grid-stride loop over the chunks covering
#: larger arrays.
MAX_BLOCKS = 1 if _SIMULATOR else 1024

#: Elements per chunk of the GPU engine, the work of one block: 64 per thread
#: of a 256-thread block. ResNet-50's two largest groups make 516 and 616
#: chunks, about the 528 blocks an H100 holds at once; a block's work still
#: outweighs its two block-wide reductions.
GPU_CHUNK = 1 << 14

#: Pairs per launch of the GPU engine. A group of flat pairs travels as one
#: table of their arrays' addresses, whatever its number of pairs, so this
#: bounds only what a call keeps on the device per pair (a ticket and a row
#: of totals); ResNet-50's 161 float32 arrays take one group, 2 launches.
GROUP_PAIRS = 1024

#: Launch plans (chunk tables on the device) kept per process: a training loop
#: makes one, more if it alternates between models; ResNet-50's takes 84 KB.
PLANS_KEPT = 8

#: Streams whose scratch (a few KB each) is kept per process: a training loop
#: uses one, a thread pool on the per-thread default stream one per thread.
STREAMS_KEPT = 16

#: Dropped buffers kept until the kernels queued before they were dropped are
#: done (see :doc:`/gpu`); past this, the oldest is waited for.
BUFFERS_RETIRING = 32
