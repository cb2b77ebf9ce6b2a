# SocketConnection: one framed socket, its writers and its readers (included by
# _msgloop.pyx; the fields are declared in _msgloop.pxd).


cdef class SocketConnection:
    """One framed, authenticated (or authenticating) socket served by a MessageLoop."""

    def __cinit__(self):
        self.fd = -1
        self.send_lock = PyThread_allocate_lock()
        self.read_lock = PyThread_allocate_lock()
        if self.send_lock == NULL or self.read_lock == NULL:
            raise MemoryError()
        self.outq = []
        self.pending = []
        self.out_off = 0
        self.keepalive.fd = -1
        self.keepalive.send_lock = self.send_lock
        self.keepalive.last_write_ns = _monotonic_ns()

    def __dealloc__(self):
        keepalive_remove(&self.keepalive)  # (closed connections are removed already)
        if self.send_lock != NULL:
            PyThread_free_lock(self.send_lock)
        if self.read_lock != NULL:
            PyThread_free_lock(self.read_lock)

    @property
    def is_closed(self):
        return self.closed

    @property
    def bytes_sent(self):
        """Bytes written: frames, and the keepalive thread's pings."""
        return self.frame_bytes_sent + self.keepalive.ping_bytes

    @property
    def keeps_alive(self):
        """Pinged by the keepalive thread whenever it is quiet (see _keepalive.pyx)."""
        return True

    def start_keepalive(self):
        """Let the keepalive thread ping this connection when it is quiet (once the
        peer reads frames: after the handshake and its IDENTIFY)."""
        if self.closed or self.handshake is not None:
            return
        self.keepalive.fd = self.fd
        keepalive_add(&self.keepalive)

    def unread_nbytes(self):
        """Bytes the kernel holds for this socket that nobody has read yet: a peer
        whose pings wait here has spoken, even if this process could not read."""
        cdef int n = 0
        if self.closed or self.fd < 0 or ioctl(self.fd, FIONREAD, &n) < 0:
            return 0
        return n

    cdef int _acquire(self) except -1:
        cdef int ok
        if PyThread_acquire_lock(self.send_lock, NOWAIT_LOCK):
            return 0
        # Wait without the GIL: the holder needs it to finish its sendmsg.
        with nogil:
            ok = PyThread_acquire_lock(self.send_lock, WAIT_LOCK)
        return 0

    cdef int _release(self) except -1:
        # The keepalive thread must not write between the parts of a frame.
        self.keepalive.half_written = bool(self.outq)
        if self.close_fd_pending and self.fd >= 0:
            c_close(self.fd)
            self.fd = -1
            self.close_fd_pending = False
        PyThread_release_lock(self.send_lock)
        return 0

    cdef int _move_pending(self) except -1:
        if self.pending:
            self.outq.extend(self.pending)
            self.msgs_sent += len(self.pending)
            self.pending = []
        return 0

    cdef Py_ssize_t _write_some(self) except -1:
        """One gathered sendmsg of the queue head (send_lock held); bytes written, 0 if full."""
        cdef iovec iov[MAX_IOV]
        cdef Py_buffer views[MAX_IOV]
        cdef msghdr msg
        cdef Py_ssize_t niov = 0, i, written, off = self.out_off, total = 0, left
        cdef int err = 0
        if not self.outq:
            return 0
        if self.fd < 0 or self.closed:
            raise ConnectionResetError("connection closed")
        if self.keepalive.ping_left:
            self._finish_ping()
        try:
            for seg in self.outq:
                if niov == MAX_IOV:
                    break
                PyObject_GetBuffer(seg, &views[niov], PyBUF_SIMPLE)
                iov[niov].iov_base = <char*>views[niov].buf + off
                iov[niov].iov_len = views[niov].len - off
                total += views[niov].len - off
                off = 0
                niov += 1
            msg.msg_name = NULL
            msg.msg_namelen = 0
            msg.msg_iov = iov
            msg.msg_iovlen = niov
            msg.msg_control = NULL
            msg.msg_controllen = 0
            msg.msg_flags = 0
            if total <= SEND_WITH_GIL_MAX:
                # A small non-blocking write takes a few µs: releasing the GIL for it
                # would hand the GIL to the loop thread and wait to get it back.
                written = _sendmsg_retrying(self.fd, &msg)
            else:
                with nogil:
                    written = _sendmsg_retrying(self.fd, &msg)
            if written < 0:
                err = errno
            # Drop the segments the kernel took whole; remember how far into the next.
            if written > 0:
                i = 0
                left = written
                while i < niov and left >= <Py_ssize_t>iov[i].iov_len:
                    left -= iov[i].iov_len
                    i += 1
                if i:
                    del self.outq[:i]
                self.out_off = left if i else self.out_off + left
        finally:
            for i in range(niov):
                PyBuffer_Release(&views[i])
        if written < 0:
            if err == EAGAIN:
                return 0
            raise ConnectionResetError(err, os.strerror(err))
        self.frame_bytes_sent += written
        self.keepalive.last_write_ns = _monotonic_ns()
        self.writes += 1
        return written

    cdef int _finish_ping(self) except -1:
        """Write what the kernel did not take of a keepalive ping (send_lock held),
        before any other byte: a frame must not start inside it."""
        cdef pollfd pfd
        cdef Py_ssize_t r
        while self.keepalive.ping_left:
            with nogil:
                r = keepalive_send_rest(&self.keepalive)
            if r < 0 and errno != EAGAIN and errno != EINTR:
                raise ConnectionResetError(errno, os.strerror(errno))
            if r <= 0:
                pfd.fd = self.fd
                pfd.events = POLLOUT
                pfd.revents = 0
                with nogil:
                    poll(&pfd, 1, 1000)
                if self.closed:
                    raise ConnectionResetError("connection closed")
        return 0

    cdef int _flush_blocking(self) except -1:
        cdef pollfd pfd
        cdef int r
        while self.outq:
            if self._write_some() == 0 and self.outq:
                pfd.fd = self.fd
                pfd.events = POLLOUT
                pfd.revents = 0
                with nogil:
                    r = poll(&pfd, 1, 1000)
                if r < 0 and errno == EINTR:
                    PyErr_CheckSignals()
                if self.closed:
                    raise ConnectionResetError("connection closed")
        return 0

    cdef int _try_flush_nowait(self) except -1:
        """Write what the loop thread queued, without ever waiting for send_lock."""
        if not PyThread_acquire_lock(self.send_lock, NOWAIT_LOCK):
            # A sender holds the lock; it drains `pending` before releasing, and
            # EPOLLOUT brings us back here in case it released just before our append.
            self.loop._set_write_interest(self, True)
            return 0
        try:
            self._move_pending()
            if self.outq:
                self._write_some()
            self.loop._set_write_interest(self, bool(self.outq))
        finally:
            self._release()
        return 0

    def send_frame(self, int kind, int flags, unsigned int aux, unsigned int whence,
                   unsigned long long ref_id, body=b"", buffers=()):
        """Send one frame; returns once the kernel holds all of it.

        `body` and each of `buffers` may be any contiguous buffer-protocol object;
        they are written from their own memory with one gathered sendmsg.
        """
        cdef Py_ssize_t nbufs = len(buffers), i
        cdef Py_ssize_t* lens = <Py_ssize_t*>malloc(sizeof(Py_ssize_t) * (nbufs + 1))
        if lens == NULL:
            raise MemoryError()
        cdef bytes prelude
        try:
            for i in range(nbufs):
                lens[i] = memoryview(buffers[i]).nbytes
            prelude = PyBytes_FromStringAndSize(NULL, PRELUDE_NBYTES + BUFLEN_NBYTES * nbufs)
            encode_prelude(PyBytes_AS_STRING(prelude), <unsigned char>kind, <unsigned char>flags,
                           aux, whence, ref_id, memoryview(body).nbytes, nbufs, lens)
        finally:
            free(lens)
        self._acquire()
        try:
            if self.closed:
                raise ConnectionResetError("connection closed")
            self._move_pending()
            self.outq.append(prelude)
            if len(body):
                self.outq.append(body)
            for b in buffers:
                if memoryview(b).nbytes:
                    self.outq.append(b)
            self.msgs_sent += 1
            self._flush_blocking()
            # Frames the loop thread queued while we held the lock go out now too.
            while self.pending:
                self._move_pending()
                self._flush_blocking()
        except BaseException:
            # A half-written frame leaves the stream out of sync: this connection is done.
            self.outq = []
            self.out_off = 0
            raise
        finally:
            self._release()

    def send_nowait(self, int kind, int flags, unsigned int aux, unsigned int whence,
                    unsigned long long ref_id, body=b""):
        """Send a small control frame without blocking the loop thread.

        On the loop thread the frame is queued and written when the socket and the
        send lock allow; elsewhere this is `send_frame`.
        """
        if not self.loop.in_loop_thread():
            self.send_frame(kind, flags, aux, whence, ref_id, body)
            return
        if self.closed:
            raise ConnectionResetError("connection closed")
        self.pending.append(_small_frame(kind, flags, aux, whence, ref_id, body))
        self._try_flush_nowait()

    def send_deferred(self, int kind, int flags, unsigned int aux, unsigned int whence,
                      unsigned long long ref_id, body=b""):
        """Queue a small frame; the loop thread writes the queue with one sendmsg.

        A burst of calls (pipelined remotecalls, pmap) then costs one syscall per
        burst rather than per call. A thread about to wait for a reply calls
        `flush()` first, so deferring never delays a round trip.
        """
        if self.closed:
            raise ConnectionResetError("connection closed")
        cdef bint first = not self.pending
        self.pending.append(_small_frame(kind, flags, aux, whence, ref_id, body))
        if first:
            self.loop.dirty.append(self)
            self.loop.wakeup()

    def queue_frame(self, int kind, int flags, unsigned int aux, unsigned int whence,
                    unsigned long long ref_id, body=b""):
        """Queue a small frame for this thread's next `send_frame` or `flush`.

        Unlike `send_deferred` the loop thread is not woken: the caller is about to
        send again (a worker's replies while more calls wait in its lane) and
        promises to flush. Returns how many frames are queued.
        """
        if self.closed:
            raise ConnectionResetError("connection closed")
        self.pending.append(_small_frame(kind, flags, aux, whence, ref_id, body))
        return len(self.pending)

    @property
    def has_pending(self):
        return bool(self.pending)

    def flush(self):
        """Write every deferred frame now (on this thread)."""
        if not self.pending:
            return
        self._acquire()
        try:
            if self.closed:
                raise ConnectionResetError("connection closed")
            while self.pending:
                self._move_pending()
                self._flush_blocking()
        finally:
            self._release()

    def send_raw_nowait(self, bytes data):
        """Write handshake bytes (tiny; the socket buffer is empty at that point)."""
        cdef Py_ssize_t n = len(data), r
        cdef const char* p = data
        with nogil:
            r = send(self.fd, p, n, MSG_DONTWAIT | MSG_NOSIGNAL)
        if r != n:
            raise ProtocolError("could not write the handshake")

    cdef int _read_handshake(self) except -1:
        cdef char buf[HANDSHAKE_READ_MAX]
        cdef Py_ssize_t need = self.handshake.need, r
        if need <= 0 or need > HANDSHAKE_READ_MAX:
            raise ProtocolError("handshake asked for an impossible read")
        with nogil:
            r = recv(self.fd, buf, need, MSG_DONTWAIT)
        if r == 0:
            raise ConnectionResetError("peer closed the connection during the handshake")
        if r < 0:
            if errno == EAGAIN or errno == EINTR:
                return 0
            raise ConnectionResetError(errno, os.strerror(errno))
        self.bytes_received += r
        out = self.handshake.feed(PyBytes_FromStringAndSize(buf, r))
        if out:
            self.send_raw_nowait(out)
        error = getattr(self.handshake, "error", None)
        if error is not None:
            raise error
        if self.handshake.done:
            self.handshake = None
            self.handler.on_authenticated(self)
        return 0

    cdef int _on_readable(self) except -1:
        if self.closed:
            return 0
        if self.direct_wanted:
            # A thread waits to become the reader: it reads this, and end_direct turns
            # the loop's interest back on. (Should its wait time out instead, the
            # lock's holder, a direct reader too, does that when it ends.)
            self.loop._set_read_interest(self, False)
            return 0
        if not PyThread_acquire_lock(self.read_lock, NOWAIT_LOCK):
            return 0  # a thread is reading this connection directly
        try:
            if self.handshake is not None:
                self._read_handshake()
            else:
                self._read_available()
        finally:
            PyThread_release_lock(self.read_lock)
        return 0

    cdef int _read_available(self) except -1:
        """Read what the socket holds (read_lock held) and dispatch the frames."""
        cdef char* ptr
        cdef Py_ssize_t n, r
        cdef int i, err
        for i in range(MAX_READS_PER_WAKE):
            self.reader.c_get_buffer(&ptr, &n)
            with nogil:
                r = recv(self.fd, ptr, n, MSG_DONTWAIT)
                err = errno
            if r > 0:
                self.bytes_received += r
                self.reader.c_buffer_updated(r)
                if r < n:
                    break
            elif r == 0:
                self._deliver()
                self.close(ConnectionResetError("peer closed the connection"))
                return 0
            elif err == EINTR:
                continue
            elif err == EAGAIN:
                break
            else:
                self._deliver()
                self.close(ConnectionResetError(err, os.strerror(err)))
                return 0
        self._deliver()
        return 0

    def begin_direct(self, double timeout=0.0):
        """Become this connection's reader: the loop thread leaves it alone until
        `end_direct()`. A thread about to send a request and wait for its reply
        calls it *before* sending, so the reply can only wake that thread — not
        the loop thread, which would then have to wake it. False if another
        thread is reading it now (and, given a `timeout` in seconds, still was
        that long: the loop thread under a steady stream holds the role nearly
        all the time, and gives it up only to a thread already waiting for it).
        """
        cdef int got
        cdef long long us = <long long>(timeout * 1e6)
        if self.closed or self.handshake is not None:
            return False
        if us > 0:
            # The loop thread, seeing this, stops reading the connection (_on_readable)
            # rather than taking the lock again before this thread wakes up.
            self.direct_wanted = True
            try:
                with nogil:
                    got = PyThread_acquire_lock_timed(self.read_lock, us, 0)
                # Timed out just as the lock came free: the loop thread, which may have
                # turned its interest off for us meanwhile, will not read it; we must.
                if got != 1 and PyThread_acquire_lock(self.read_lock, NOWAIT_LOCK):
                    got = 1
            finally:
                self.direct_wanted = False
            if got != 1 or self.closed:
                if got == 1:
                    PyThread_release_lock(self.read_lock)
                return False
        elif not PyThread_acquire_lock(self.read_lock, NOWAIT_LOCK):
            return False
        try:
            self.loop._set_read_interest(self, False)
        except BaseException:
            PyThread_release_lock(self.read_lock)
            raise
        return True

    cdef int _spin(self, pollfd* pfd, int n) noexcept nogil:
        """Poll `pfd[:n]` without sleeping for for a moment (_poll.pyx), unless recent spins on
        this connection went unanswered; poll's result (0: nothing came)."""
        cdef int r
        if _spin_ns <= 0:
            return 0
        if self.spin_skip > 0:
            self.spin_skip -= 1
            return 0
        r = _poll_spinning(pfd, n)
        if r == 0:
            self.spin_misses = min(self.spin_misses * 2 + 1, MAX_SPIN_SKIP)
            self.spin_skip = self.spin_misses
        else:
            self.spin_misses = 0
        return r

    def poll_direct(self, double timeout, int wake_fd=-1):
        """As this connection's reader, wait up to `timeout` s for frames and dispatch
        them on this thread; 1 if something was read, 0 on timeout. It polls
        without sleeping for a moment first (see _poll.pyx). A `wake_fd` (an
        eventfd) ends the wait too, and is drained: a worker's idle main thread
        waits so for calls and for work handed to it by the loop thread."""
        cdef pollfd pfd[2]
        cdef int r, n = 2 if wake_fd >= 0 else 1
        cdef int ms = <int>(timeout * 1000) if timeout >= 0 else -1
        cdef uint64_t counter
        if self.closed:
            return 1
        pfd[0].fd = self.fd
        pfd[0].events = POLLIN
        pfd[0].revents = 0
        pfd[1].fd = wake_fd
        pfd[1].events = POLLIN
        pfd[1].revents = 0
        with nogil:
            r = self._spin(pfd, n) if ms != 0 else 0
            if r == 0:
                r = poll(pfd, n, ms)
            if r > 0 and pfd[1].revents:
                c_read(wake_fd, &counter, 8)
        if r > 0:
            # A Ctrl-C that came while we waited raises here, before any frame is
            # taken: raised while dispatching, it would drop other callers' frames.
            PyErr_CheckSignals()
            if pfd[0].revents:
                self._read_available()
        elif r < 0 and errno == EINTR:
            PyErr_CheckSignals()
        return 1 if r > 0 else 0

    def end_direct(self):
        """Give the connection back to the loop thread."""
        try:
            if not self.closed:
                self.loop._set_read_interest(self, True)
        finally:
            PyThread_release_lock(self.read_lock)

    def read_direct(self, double timeout):
        """`begin_direct`, `poll_direct(timeout)`, `end_direct`: 1 if something was
        read, 0 on timeout, -1 if another thread is reading."""
        if not self.begin_direct():
            return -1
        try:
            return self.poll_direct(timeout)
        finally:
            self.end_direct()

    def _deliver(self):
        frames = self.reader.take_frames()
        if frames:
            self.msgs_received += len(frames)
            self.handler.on_frames(self, frames)

    def close(self, exc=None):
        """Stop serving this connection and tell the handler (once)."""
        if self.closed:
            return
        self.closed = True
        keepalive_remove(&self.keepalive)
        self.keepalive.fd = -1
        self.loop.conns.pop(self.fd, None)
        if self.fd >= 0:
            epoll_ctl(self.loop.epfd, EPOLL_CTL_DEL, self.fd, NULL)
            shutdown(self.fd, SHUT_RDWR)
            # Close the fd only once no sender is inside sendmsg on it.
            if PyThread_acquire_lock(self.send_lock, NOWAIT_LOCK):
                c_close(self.fd)
                self.fd = -1
                PyThread_release_lock(self.send_lock)
            else:
                self.close_fd_pending = True
        self.pending = []
        try:
            self.handler.on_close(self, exc)
        except Exception:
            _report("a connection close handler")

    def stats(self):
        return {
            "msgs_sent": self.msgs_sent,
            "bytes_sent": self.frame_bytes_sent + self.keepalive.ping_bytes,
            "writes": self.writes,
            "msgs_received": self.msgs_received,
            "bytes_received": self.bytes_received,
        }


# A map waiting on several workers polls at most this many connections at once.
cdef enum:
    MAX_DIRECT_CONNS = 64
POLL_DIRECT_MANY_MAX = MAX_DIRECT_CONNS


def poll_direct_many(list conns, double timeout):
    """`poll_direct` over several connections this thread is the reader of (see
    `begin_direct`): wait up to `timeout` s (negative: no limit) for any of them,
    then read and dispatch what each holds, on this thread. A thread that waits for
    the replies of many peers (pmap) is then woken by the sockets themselves, not
    by the loop thread that would have read them and then had to wake it.
    Returns how many had something (0 on timeout)."""
    cdef pollfd fds[MAX_DIRECT_CONNS]
    cdef SocketConnection conn
    cdef Py_ssize_t i, n = len(conns)
    # (A timeout is rounded up to whole milliseconds: rounded down, a caller waiting
    # for a moment a fraction of a millisecond away would poll in a busy loop.)
    cdef int r = 0, ms = <int>(timeout * 1000 + 0.999) if timeout >= 0 else -1
    if n > MAX_DIRECT_CONNS:
        raise ValueError(f"at most {MAX_DIRECT_CONNS} connections")
    for i in range(n):
        conn = <SocketConnection?>conns[i]
        if conn.closed:
            return 1  # its reader sees it closed: the caller looks again
        fds[i].fd = conn.fd
        fds[i].events = POLLIN
        fds[i].revents = 0
    with nogil:
        if _spin_ns > 0 and ms != 0:
            r = _poll_spinning(fds, <int>n)
        if r == 0:
            r = poll(fds, n, ms)
    if r > 0:
        PyErr_CheckSignals()  # before any frame is taken, as in poll_direct
        for i in range(n):
            if fds[i].revents:
                conn = <SocketConnection>conns[i]
                if not conn.closed:
                    conn._read_available()
    elif r < 0 and errno == EINTR:
        PyErr_CheckSignals()
    return r if r > 0 else 0
