/* accmark on|off: switch the host's access capture (dmfrag/capture/capture.c)
 * on or off. The capture plugin watches for the instruction executed here:
 * an 8-byte no-op whose displacement reads "DMF1" (on) or "DMF0" (off).
 * Without the plugin it does nothing.
 *
 * No C library: a few hundred bytes, so that the capture's initramfs is
 * the plain one but for this file (the initrd's size moves boot-time
 * placement). Built with gcc -static -nostdlib (dmfrag.capture). */

__asm__(".globl _start\n"
	"_start:\n"
	"	mov (%rsp), %rdi\n"          /* argc */
	"	lea 8(%rsp), %rsi\n"         /* argv */
	"	and $-16, %rsp\n"
	"	call accmark_main\n"
	"	mov %eax, %edi\n"
	"	mov $60, %eax\n"             /* exit */
	"	syscall\n");

int accmark_main(long argc, char **argv)
{
	const char *a = argc == 2 ? argv[1] : "";

	if (a[0] == 'o' && a[1] == 'n' && a[2] == 0) {
		__asm__ volatile(".byte 0x0f, 0x1f, 0x84, 0x00, 0x44, 0x4d, 0x46, 0x31");
		return 0;
	}
	if (a[0] == 'o' && a[1] == 'f' && a[2] == 'f' && a[3] == 0) {
		__asm__ volatile(".byte 0x0f, 0x1f, 0x84, 0x00, 0x44, 0x4d, 0x46, 0x30");
		return 0;
	}
	return 2;
}
