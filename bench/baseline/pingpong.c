/*
 * Raw-socket reference figures: the best a process-to-process runtime can hope
 * for over the same kernel path, with no serialisation and no threads.
 *
 *   pingpong tcp|unix ROUNDS BULK_BYTES REPS [PARENT_CPU CHILD_CPU]
 *
 * Forks one child. For each of REPS repetitions it measures
 *   - ROUNDS round trips of an 8-byte message (parent -> child -> parent),
 *   - BULK_BYTES sent parent -> child ("to"), acknowledged by one byte,
 *   - BULK_BYTES sent child -> parent ("from") after a one-byte request.
 * Both sides use buffers allocated and touched before timing, and one
 * unreported warm-up repetition runs first, so the bulk figures are the
 * socket path alone (no first-touch page faults).
 *
 * With PARENT_CPU and CHILD_CPU each process is pinned to that CPU (the
 * same number for both puts them on one core); by default the scheduler
 * places them.
 *
 * Prints one JSON object on stdout:
 *   {"mode": "tcp", "rounds": N, "bulk_bytes": B,
 *    "rtt_us": [...], "to_gbs": [...], "from_gbs": [...]}
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <sched.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) {
    perror(what);
    exit(2);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void write_all(int fd, const char *buf, size_t n) {
    while (n > 0) {
        ssize_t k = write(fd, buf, n);
        if (k < 0) {
            if (errno == EINTR) continue;
            die("write");
        }
        buf += k;
        n -= (size_t)k;
    }
}

static void read_all(int fd, char *buf, size_t n) {
    while (n > 0) {
        ssize_t k = read(fd, buf, n);
        if (k < 0) {
            if (errno == EINTR) continue;
            die("read");
        }
        if (k == 0) {
            fprintf(stderr, "unexpected EOF\n");
            exit(2);
        }
        buf += k;
        n -= (size_t)k;
    }
}

static void pin(int cpu) {
    if (cpu < 0) return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set) < 0) die("sched_setaffinity");
}

static void nodelay(int fd) {
    int one = 1;
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0) die("TCP_NODELAY");
}

/* The child mirrors the parent's schedule exactly. */
static void child_loop(int fd, long rounds, size_t bulk, int reps, char *buf) {
    char msg[8];
    memset(buf, 2, bulk); /* own copy of the pages now, not copy-on-write */
    for (int r = 0; r <= reps; r++) {
        for (long i = 0; i < rounds; i++) {
            read_all(fd, msg, sizeof msg);
            write_all(fd, msg, sizeof msg);
        }
        read_all(fd, buf, bulk); /* to */
        write_all(fd, "k", 1);
        read_all(fd, msg, 1); /* from */
        write_all(fd, buf, bulk);
    }
}

int main(int argc, char **argv) {
    if (argc != 5 && argc != 7) {
        fprintf(stderr, "usage: %s tcp|unix ROUNDS BULK_BYTES REPS [PARENT_CPU CHILD_CPU]\n", argv[0]);
        return 2;
    }
    int parent_cpu = argc == 7 ? atoi(argv[5]) : -1;
    int child_cpu = argc == 7 ? atoi(argv[6]) : -1;
    const char *mode = argv[1];
    long rounds = atol(argv[2]);
    size_t bulk = (size_t)atoll(argv[3]);
    int reps = atoi(argv[4]);
    int tcp = strcmp(mode, "tcp") == 0;
    if (!tcp && strcmp(mode, "unix") != 0) {
        fprintf(stderr, "mode must be tcp or unix\n");
        return 2;
    }

    char *buf = malloc(bulk ? bulk : 1);
    if (!buf) die("malloc");
    memset(buf, 1, bulk);

    int pfd, cfd;
    if (tcp) {
        int lfd = socket(AF_INET, SOCK_STREAM, 0);
        if (lfd < 0) die("socket");
        struct sockaddr_in a;
        memset(&a, 0, sizeof a);
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        a.sin_port = 0;
        if (bind(lfd, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
        socklen_t al = sizeof a;
        if (getsockname(lfd, (struct sockaddr *)&a, &al) < 0) die("getsockname");
        if (listen(lfd, 1) < 0) die("listen");
        cfd = socket(AF_INET, SOCK_STREAM, 0);
        if (cfd < 0) die("socket");
        if (connect(cfd, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
        pfd = accept(lfd, NULL, NULL);
        if (pfd < 0) die("accept");
        close(lfd);
        nodelay(pfd);
        nodelay(cfd);
    } else {
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0) die("socketpair");
        pfd = sv[0];
        cfd = sv[1];
    }

    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) die("fork");
    if (pid == 0) {
        pin(child_cpu);
        close(pfd);
        child_loop(cfd, rounds, bulk, reps, buf);
        _exit(0);
    }
    close(cfd);
    pin(parent_cpu);

    double *rtt = calloc((size_t)reps, sizeof(double));
    double *to = calloc((size_t)reps, sizeof(double));
    double *from = calloc((size_t)reps, sizeof(double));
    char msg[8] = {0};
    /* Repetition 0 is a warm-up (page faults, socket buffer growth), not reported. */
    for (int r = -1; r < reps; r++) {
        double *rtt_r = r < 0 ? &(double){0} : &rtt[r];
        double *to_r = r < 0 ? &(double){0} : &to[r];
        double *from_r = r < 0 ? &(double){0} : &from[r];
        double t0 = now();
        for (long i = 0; i < rounds; i++) {
            write_all(pfd, msg, sizeof msg);
            read_all(pfd, msg, sizeof msg);
        }
        *rtt_r = (now() - t0) / (double)rounds * 1e6;

        t0 = now();
        write_all(pfd, buf, bulk);
        read_all(pfd, msg, 1);
        *to_r = (double)bulk / (now() - t0) / 1e9;

        t0 = now();
        write_all(pfd, "g", 1);
        read_all(pfd, buf, bulk);
        *from_r = (double)bulk / (now() - t0) / 1e9;
    }
    int status = 0;
    waitpid(pid, &status, 0);

    printf("{\"mode\": \"%s\", \"rounds\": %ld, \"bulk_bytes\": %zu", mode, rounds, bulk);
    const char *names[3] = {"rtt_us", "to_gbs", "from_gbs"};
    double *arrs[3] = {rtt, to, from};
    for (int k = 0; k < 3; k++) {
        printf(", \"%s\": [", names[k]);
        for (int r = 0; r < reps; r++) printf("%s%.6g", r ? ", " : "", arrs[k][r]);
        printf("]");
    }
    printf("}\n");
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
}
