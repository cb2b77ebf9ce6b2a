# A large copy split over a few threads (included by _shm.pyx).
#
# On the machine of bench/RESULTS.md one core copies about 7 GB/s, two about 12
# (memory is not the limit for one thread). A buffer of many megabytes going into
# shared memory is on the critical path of its call, so its copy takes the idle
# cores as well: pieces of at least PARALLEL_COPY_PIECE bytes, one per core, at
# most MAX_COPY_THREADS. A thread that cannot be started leaves its piece to the
# calling thread; the helpers block every signal, so none is taken away from the
# threads that wait for it.

cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    int pthread_create(pthread_t *thread, const void *attr,
                       void *(*start)(void *) noexcept nogil, void *arg)
    int pthread_join(pthread_t thread, void **retval)

cdef extern from "<signal.h>" nogil:
    ctypedef struct sigset_t:
        pass
    int sigfillset(sigset_t *s)
    int pthread_sigmask(int how, const sigset_t *s, sigset_t *old)
    int SIG_SETMASK

cdef enum:
    MAX_COPY_THREADS = 4

# Below this, a piece is not worth a thread (starting one costs tens of µs, copying
# 2 MiB about 300).
cdef size_t PARALLEL_COPY_PIECE = 2 << 20

cdef int _copy_threads = max(1, min(MAX_COPY_THREADS, len(os.sched_getaffinity(0))))

ctypedef struct _CopyPiece:
    char *dst
    const char *src
    size_t n


cdef void *_copy_piece(void *arg) noexcept nogil:
    cdef _CopyPiece *piece = <_CopyPiece *>arg
    memcpy(piece.dst, piece.src, piece.n)
    return NULL


cdef void _parallel_copy(char *dst, const char *src, size_t n) noexcept nogil:
    """memcpy(dst, src, n), in pieces on up to `_copy_threads` threads."""
    cdef int k = <int>min(<size_t>_copy_threads, n // PARALLEL_COPY_PIECE), i
    if k <= 1:
        memcpy(dst, src, n)
        return
    cdef _CopyPiece pieces[MAX_COPY_THREADS]
    cdef pthread_t threads[MAX_COPY_THREADS]
    cdef bint started[MAX_COPY_THREADS]
    cdef size_t step = (n // <size_t>k + 4095) & ~(<size_t>4095), at = 0
    cdef sigset_t all_signals, previous
    for i in range(k):
        pieces[i].dst = dst + at
        pieces[i].src = src + at
        pieces[i].n = n - at if i == k - 1 else min(step, n - at)  # the last takes the rest
        at += pieces[i].n
    sigfillset(&all_signals)
    pthread_sigmask(SIG_SETMASK, &all_signals, &previous)  # the helpers inherit it
    for i in range(1, k):
        started[i] = pthread_create(&threads[i], NULL, _copy_piece, &pieces[i]) == 0
    pthread_sigmask(SIG_SETMASK, &previous, NULL)
    _copy_piece(&pieces[0])
    for i in range(1, k):
        if started[i]:
            pthread_join(threads[i], NULL)
        else:
            _copy_piece(&pieces[i])
