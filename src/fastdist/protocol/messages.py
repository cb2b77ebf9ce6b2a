"""Message kinds and flags: one name per kind, the frame header fields each uses.

A frame's header names the reference it is about as (whence, id) — the pid that
made the reference and a counter on that pid — so that a result finds its
waiter without unpickling anything (docs/PROTOCOL.md has the full table).
"""

from __future__ import annotations

import enum
import struct


class Kind(enum.IntEnum):
    """The `kind` byte of a frame."""

    IDENTIFY = 1  # first frame on a connection: body = pickled dict (pid, role, cluster facts)
    CALL = 2  # run f(*a, **k); push the result to whence (kept here too if others hold it)
    CALL_FETCH = 3  # run f(*a, **k); reply RESULT to (whence, id), keep nothing
    REMOTE_DO = 4  # run f(*a, **k); no reply
    RESULT = 5  # the value (or error, FLAG_ERROR) for waiter (whence, id)
    FETCH = 6  # send the value of ref (whence, id) owned here; aux = requester's waiter id
    PUT_FUTURE = 7  # set the value of Future (whence, id) owned here (see FLAG_RESTORE)
    REFS = 8  # batched reference-count changes, body = packed REF_RECORDs
    PING = 9  # liveness: sent on a connection quiet for a while (never answered)
    PONG = 10  # (what older peers answered a PING with; ignored)
    PEERS = 11  # master -> worker: body = pickled list of peer facts (pid, host, port, ...)
    CONNECT_BACK = 12  # ask a higher pid to open the worker-to-worker link to aux = pid
    INTERRUPT = 13  # raise KeyboardInterrupt in the calls running on this process
    LOG = 14  # worker -> master: body = pickled logging record dict
    EXIT = 15  # master -> worker: finish and exit
    FORGET_FUNCS = 16  # CachingPool: drop cached functions, body = packed u64 ids
    SHM_OFFER = 17  # body = sender's pid, probe fd, token: can you map my segments? (sharedmem.py)
    SHM_ACCEPT = 18  # yes: large buffers to me may travel in shared memory
    SHM_FORGET = 19  # the sender dropped these segments (body = u64 ids): unmap them


KNOWN_KINDS = frozenset(int(k) for k in Kind)

# The kinds read or written for every call, as plain ints: an int is read and compared
# in a few ns, an enum member looked up in ~40 (90 with the comparison).
CALL = int(Kind.CALL)
CALL_FETCH = int(Kind.CALL_FETCH)
RESULT = int(Kind.RESULT)

# Flags.
FLAG_ERROR = 0x01  # RESULT: the body is a pickled CapturedException (or a stand-in)
# RESULT pushed for a CALL: the owner kept no copy (nobody else held the reference), so
# the caller's hold is used up. Should the caller have passed the reference on before
# the value came, it sends the value back with PUT_FUTURE + FLAG_RESTORE.
FLAG_RELEASED = 0x02
# PUT_FUTURE: a released value coming back (FLAG_ERROR may be set too): store it if
# unset, drop the creator's hold, reply nothing.
FLAG_RESTORE = 0x04
# CALL, CALL_FETCH, REMOTE_DO sent through a worker pool (pmap, remote, remotecall on a
# pool, the Executor): the worker runs them one at a time per caller, in order — a
# pool gives a worker one call at a time — and other calls beside them.
FLAG_SERIAL = 0x08

# REFS body: one record per change, (whence u32, client pid u32, id u64, delta i64).
REF_RECORD = struct.Struct("<IIqq")
# FETCH and PUT_FUTURE bodies start with the reference they are about (whence, id).
REF_HEADER = struct.Struct("<IQ")
FUNC_ID = struct.Struct("<Q")
