/* memfd_secret: create a secret memory area of N pages, touch every page,
 * print, then unmap and close.  Usage: secretmem N [hold|bg]: "hold" stays
 * until killed; "bg" forks once the pages are touched, the child holds them
 * (the parent prints and exits). */
#include <stdio.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef __NR_memfd_secret
#define __NR_memfd_secret 447
#endif

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 1;
    long page = sysconf(_SC_PAGESIZE);
    int fd = syscall(__NR_memfd_secret, 0);
    if (fd < 0) { perror("memfd_secret"); return 1; }
    if (ftruncate(fd, n * page) != 0) { perror("ftruncate"); return 1; }
    char *p = mmap(NULL, n * page, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) { perror("mmap"); return 1; }
    for (long i = 0; i < n; i++) p[i * page] = 1;
    if (argc > 2 && strcmp(argv[2], "bg") == 0) {
        pid_t pid = fork();
        if (pid < 0) { perror("fork"); return 1; }
        if (pid > 0) {
            printf("secretmem: %ld pages touched, held by pid %d\n", n, (int)pid);
            fflush(stdout);
            return 0;
        }
        int null = open("/dev/null", O_RDWR);
        if (null >= 0) { dup2(null, 1); dup2(null, 2); }
        for (;;) pause();
    }
    printf("secretmem: %ld pages touched\n", n);
    fflush(stdout);
    if (argc > 2) pause();
    munmap(p, n * page);
    close(fd);
    return 0;
}
