# The C-level state of the frame reader and the receive buffers (see docs/PROTOCOL.md).

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t


cdef enum:
    PRELUDE_NBYTES = 32     # kind, flags, nbufs, aux, whence, reserved, id, body_nbytes
    BUFLEN_NBYTES = 8       # one u64 length per out-of-band buffer


cdef class RecvBuffer:
    cdef char* data             # malloc'd or mmap'd, never zero-filled: recv writes every byte
    cdef Py_ssize_t nbytes      # size of data
    cdef Py_ssize_t mapped      # length of the mmap behind data, or 0 if malloc'd
    cdef Py_ssize_t filled      # bytes written so far by the reader
    cdef int exports            # live buffer-protocol views (for debugging and tests)


cdef class Frame:
    cdef public uint8_t kind            # message kind (protocol/messages.py names them)
    cdef public uint8_t flags           # per-kind bit flags
    cdef public uint32_t aux            # a small per-kind integer
    cdef public uint32_t whence         # the pid part of the reference this frame is about
    cdef public uint64_t id             # the id part of that reference
    cdef public object body             # bytes (small) or RecvBuffer (large): the pickle stream
    cdef public list buffers            # out-of-band buffers, each a RecvBuffer


cdef class FrameReader:
    cdef char* staging              # reusable buffer that small parts of frames land in
    cdef Py_ssize_t staging_nbytes  # its capacity
    cdef Py_ssize_t rpos            # first unparsed byte in staging
    cdef Py_ssize_t wpos            # one past the last received byte in staging
    cdef Py_ssize_t direct_threshold  # a body at least this large gets its own allocation
    cdef uint64_t max_frame_nbytes  # body + buffers above this is a protocol error
    cdef uint32_t max_nbufs         # more out-of-band buffers than this is a protocol error
    cdef int state                  # READ_PRELUDE, READ_BUFLENS, READ_BODY, READ_BUFFER
    cdef Frame frame                # the frame being assembled
    cdef uint16_t nbufs             # out-of-band buffers the current frame carries
    cdef uint64_t body_nbytes       # its body length
    cdef uint64_t* buflens          # its buffer lengths (malloc'd, max_nbufs entries)
    cdef Py_ssize_t buf_index       # which buffer is being read
    cdef RecvBuffer target          # where direct reads land (large body or a buffer)
    cdef list ready                 # complete frames not yet taken by the caller

    cdef int c_get_buffer(self, char** ptr, Py_ssize_t* nbytes) except -1
    cdef int c_buffer_updated(self, Py_ssize_t nbytes) except -1
    cdef int _parse(self) except -1
    cdef int _begin_buffer(self) except -1
    cdef int _begin_body(self) except -1
    cdef int _finish_frame(self) except -1
    cdef int _fill_target_from_staging(self) except -1


cdef Py_ssize_t encode_prelude(char* out, uint8_t kind, uint8_t flags, uint32_t aux,
                               uint32_t whence, uint64_t ref_id, uint64_t body_nbytes,
                               Py_ssize_t nbufs, Py_ssize_t* buflens) noexcept nogil
