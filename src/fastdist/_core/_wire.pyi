"""Types of the compiled module `_wire.pyx` (see its docstrings)."""

from typing import Any

PRELUDE_SIZE: int
DEFAULT_MAX_FRAME_NBYTES: int
DEFAULT_MAX_NBUFS: int
DEFAULT_STAGING_NBYTES: int
DEFAULT_DIRECT_THRESHOLD: int
HUGE_BUFFER_NBYTES: int
HUGE_PAGE_NBYTES: int
HUGE_ADVICE_MAX_NBYTES: int
NONCE_NBYTES: int
MAC_NBYTES: int
HELLO_NBYTES: int
ACCEPT_NBYTES: int
PROOF_NBYTES: int
WELCOME_NBYTES: int
HELLO_MAGIC: bytes
ACCEPT_MAGIC: bytes
PROOF_MAGIC: bytes
WELCOME: bytes
STATUS_OK: int
STATUS_VERSION_MISMATCH: int

def pack_prelude(kind: int, flags: int, aux: int, whence: int, ref_id: int,
                 body_nbytes: int, buflens: list[int]) -> bytes: ...
def live_recv_buffers() -> tuple[int, int]: ...

class RecvBuffer:
    def __init__(self, nbytes: int) -> None: ...
    def __len__(self) -> int: ...
    def __buffer__(self, flags: int) -> memoryview: ...
    @property
    def address(self) -> int: ...

class Frame:
    kind: int
    flags: int
    aux: int
    whence: int
    id: int
    body: Any  # bytes, or a RecvBuffer for a large body
    buffers: list[Any]  # RecvBuffer, or what shared memory maps in their place

class FrameReader:
    def __init__(self, max_frame_nbytes: int = ..., max_nbufs: int = ...,
                 staging_nbytes: int = ..., direct_threshold: int = ...) -> None: ...
    def get_buffer(self) -> memoryview: ...
    def buffer_updated(self, nbytes: int) -> None: ...
    def feed(self, data: Any) -> None: ...
    def take_frames(self) -> list[Frame]: ...
    @property
    def mid_frame(self) -> bool: ...

def pack_hello(version: int, nonce: bytes) -> bytes: ...
def unpack_hello(data: bytes) -> tuple[int, bytes]: ...
def pack_accept(version: int, status: int, nonce: bytes, mac: bytes) -> bytes: ...
def unpack_accept(data: bytes) -> tuple[int, int, bytes, bytes]: ...
def pack_proof(mac: bytes) -> bytes: ...
def unpack_proof(data: bytes) -> bytes: ...
