/* Age the unmovable free lists as a machine that has run a while: create N
 * pipes, write 64 KiB into each (16 order-0 pages of GFP_HIGHUSER |
 * __GFP_ACCOUNT), close a seeded random half (N / 2 of them), print one
 * line, then hold the rest open until killed.
 * Usage: age N SEED [fg]
 * Without "fg" the holder forks: the parent prints and exits once the pipes
 * are in place (the caller goes on at once), the child holds them. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

static uint64_t state;
static uint64_t next(void)          /* xorshift64* */
{
    state ^= state >> 12; state ^= state << 25; state ^= state >> 27;
    return state * 2685821657736338717ULL;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 1;
    state = (argc > 2 ? strtoull(argv[2], NULL, 10) : 1) * 0x9E3779B97F4A7C15ULL + 1;
    int fg = argc > 3 && strcmp(argv[3], "fg") == 0;
    struct rlimit rl = { .rlim_cur = 2 * n + 64, .rlim_max = 2 * n + 64 };
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0) perror("setrlimit");
    /* no per-user pipe page limit: every pipe gets its 16 buffers */
    int sf = open("/proc/sys/fs/pipe-user-pages-soft", O_WRONLY);
    if (sf >= 0) { if (write(sf, "0\n", 2) < 0) perror("pipe-user-pages-soft"); close(sf); }
    int (*fds)[2] = calloc(n, sizeof(*fds));
    long *order = calloc(n, sizeof(*order));
    static char buf[65536];
    memset(buf, 0x5a, sizeof(buf));
    long made = 0, filled = 0;
    for (long i = 0; i < n; i++) {
        if (pipe2(fds[i], O_NONBLOCK) != 0) { perror("pipe2"); break; }
        made++;
        ssize_t w = write(fds[i][1], buf, sizeof(buf));
        if (w == (ssize_t)sizeof(buf)) filled++;
    }
    for (long i = 0; i < made; i++) order[i] = i;
    for (long i = made - 1; i > 0; i--) {          /* Fisher-Yates */
        long j = (long)(next() % (uint64_t)(i + 1));
        long t = order[i]; order[i] = order[j]; order[j] = t;
    }
    long closed = made / 2;
    for (long i = 0; i < closed; i++) {
        close(fds[order[i]][0]);
        close(fds[order[i]][1]);
    }
    pid_t pid = fg ? 0 : fork();
    if (pid < 0) { perror("fork"); return 1; }
    if (pid > 0) {
        printf("age: %ld pipes (%ld filled with 64 KiB), %ld closed, %ld held by pid %d\n",
               made, filled, closed, made - closed, (int)pid);
        fflush(stdout);
        return 0;
    }
    if (fg) {
        printf("age: %ld pipes (%ld filled with 64 KiB), %ld closed, %ld held\n",
               made, filled, closed, made - closed);
        fflush(stdout);
    }
    int null = open("/dev/null", O_RDWR);
    if (null >= 0) { dup2(null, 1); dup2(null, 2); }
    for (;;) pause();
}
