/* dumpwait POINT: mark a memory-dump point and hold still while the host
 * dumps the guest (dmfrag.truth).
 *
 * Writes "dmfrag_dump POINT" to the trace marker (when tracing is mounted),
 * then prints "@@PAUSE dump POINT PADDR SIZE" on the console, PADDR and SIZE
 * being /sys/kernel/vmcoreinfo (where the kernel keeps its VMCOREINFO note:
 * drgn needs it, and reading it here spares loading qemu_fw_cfg.ko, a module
 * load that would itself change the direct map being measured). The host
 * stops the machine on that line; this process spins on the clock meanwhile
 * (no fork, no allocation) so that the dump shows the state at the marker.
 */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	char info[128] = "0 0";
	char line[256];
	struct timespec t0, t;
	int fd, n;

	if (argc != 2) {
		fprintf(stderr, "usage: dumpwait POINT\n");
		return 2;
	}
	fd = open("/sys/kernel/vmcoreinfo", O_RDONLY);
	if (fd >= 0) {
		n = read(fd, info, sizeof(info) - 1);
		info[n > 0 ? n : 0] = 0;
		info[strcspn(info, "\n")] = 0;
		close(fd);
	}
	fd = open("/sys/kernel/tracing/trace_marker", O_WRONLY);
	if (fd >= 0) {
		n = snprintf(line, sizeof(line), "dmfrag_dump %s\n", argv[1]);
		if (write(fd, line, n) != n)
			perror("trace_marker");
		close(fd);
	}
	n = snprintf(line, sizeof(line), "@@PAUSE dump %s %s\n", argv[1], info);
	if (write(1, line, n) != n)
		return 1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	do
		clock_gettime(CLOCK_MONOTONIC, &t);
	while ((t.tv_sec - t0.tv_sec) * 1000000000L + (t.tv_nsec - t0.tv_nsec) < 1500000000L);
	return 0;
}
