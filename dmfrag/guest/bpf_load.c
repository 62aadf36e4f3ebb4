/* Load N BPF socket-filter programs of K instructions ("r0 = 0" repeated,
 * then "exit"), keep them loaded, then print how many loaded and the JIT
 * image length of the first (bpf_prog_info.jited_prog_len).
 * Usage: bpf_load N [K [hold|bg]]   (K >= 2, default 2: like a tiny sockex1).
 * "hold": stay until killed. "bg": fork once loaded; the child holds the
 * programs until killed, the parent prints the child's pid on stdout (the
 * count line on stderr) and exits, so a caller waits just for the load. */
#include <linux/bpf.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 1;
    int k = argc > 2 ? atoi(argv[2]) : 2;
    if (k < 2) k = 2;
    struct rlimit rl = { .rlim_cur = n + 64, .rlim_max = n + 64 };
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0) perror("setrlimit");
    /* Before 5.11 BPF memory is charged to RLIMIT_MEMLOCK (64 KiB by
     * default: about 16 programs); lift it so that 5.10 loads all N. */
    struct rlimit ml = { .rlim_cur = RLIM_INFINITY, .rlim_max = RLIM_INFINITY };
    if (setrlimit(RLIMIT_MEMLOCK, &ml) != 0) perror("setrlimit memlock");
    struct bpf_insn *insns = calloc(k, sizeof(*insns));
    for (int i = 0; i < k - 1; i++) {
        insns[i].code = BPF_ALU64 | BPF_MOV | BPF_K;   /* r0 = 0 */
        insns[i].dst_reg = 0;
    }
    insns[k - 1].code = BPF_JMP | BPF_EXIT;
    char license[] = "GPL";
    int loaded = 0;
    unsigned int jited = 0;
    for (int i = 0; i < n; i++) {
        union bpf_attr attr;
        memset(&attr, 0, sizeof(attr));
        attr.prog_type = BPF_PROG_TYPE_SOCKET_FILTER;
        attr.insn_cnt = k;
        attr.insns = (unsigned long)insns;
        attr.license = (unsigned long)license;
        int fd = syscall(__NR_bpf, BPF_PROG_LOAD, &attr, sizeof(attr));
        if (fd < 0) { perror("BPF_PROG_LOAD"); break; }
        if (loaded == 0) {
            struct bpf_prog_info info;
            memset(&info, 0, sizeof(info));
            memset(&attr, 0, sizeof(attr));
            attr.info.bpf_fd = fd;
            attr.info.info_len = sizeof(info);
            attr.info.info = (unsigned long)&info;
            if (syscall(__NR_bpf, BPF_OBJ_GET_INFO_BY_FD, &attr, sizeof(attr)) == 0)
                jited = info.jited_prog_len;
        }
        loaded++;
    }
    if (argc > 3 && strcmp(argv[3], "bg") == 0) {
        pid_t pid = fork();
        if (pid < 0) { perror("fork"); return 1; }
        if (pid > 0) {
            fprintf(stderr, "bpf_load: %d programs of %d instructions loaded (JIT image %u "
                    "bytes), held by pid %d\n", loaded, k, jited, (int)pid);
            printf("%d\n", (int)pid);
            fflush(stdout);
            return 0;
        }
        int null = open("/dev/null", O_RDWR);
        if (null >= 0) { dup2(null, 1); dup2(null, 2); }
        for (;;) pause();
    }
    printf("bpf_load: %d programs of %d instructions loaded (JIT image %u bytes)\n",
           loaded, k, jited);
    fflush(stdout);
    if (argc > 3) pause();     /* keep them: the caller snapshots, then kills */
    return 0;
}
