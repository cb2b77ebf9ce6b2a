"""A pure-Python reference of the frame format, the oracle the compiled reader is tested against.

It parses a complete byte string at once (no streaming, no limits beyond the
format itself); the compiled FrameReader must produce the same frames from any
chunking of the same bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

PRELUDE = struct.Struct("<BBHIIIQQ")  # kind, flags, nbufs, aux, whence, reserved, id, body_nbytes


@dataclass
class RefFrame:
    kind: int
    flags: int
    aux: int
    whence: int
    id: int
    body: bytes
    buffers: list[bytes] = field(default_factory=list)


def encode(frame: RefFrame) -> bytes:
    head = PRELUDE.pack(frame.kind, frame.flags, len(frame.buffers), frame.aux, frame.whence, 0,
                        frame.id, len(frame.body))
    lens = b"".join(struct.pack("<Q", len(b)) for b in frame.buffers)
    return head + lens + frame.body + b"".join(frame.buffers)


def decode_all(data: bytes) -> list[RefFrame]:
    frames = []
    off = 0
    while off < len(data):
        kind, flags, nbufs, aux, whence, _, ref_id, body_n = PRELUDE.unpack_from(data, off)
        off += PRELUDE.size
        lens = [struct.unpack_from("<Q", data, off + 8 * i)[0] for i in range(nbufs)]
        off += 8 * nbufs
        body = data[off:off + body_n]
        off += body_n
        bufs = []
        for n in lens:
            bufs.append(data[off:off + n])
            off += n
        frames.append(RefFrame(kind, flags, aux, whence, ref_id, body, bufs))
    return frames
