/* dmfrag's QEMU TCG plugin: the guest kernel's own memory accesses.
 *
 * Loaded with `qemu-system-x86_64 -plugin capture.so,out=PREFIX,...` (the
 * harness builds it with the host's gcc: dmfrag.capture.build_plugin). It
 * records, while capture is on:
 *
 *   - each data access of kernel code (a translated block whose address has
 *     the top bit set: ring-0 code) to a kernel address: virtual address,
 *     load or store, size;
 *   - each execution of a kernel translated block as one instruction fetch
 *     at its first byte (and one more at its last instruction's page when a
 *     block crosses a page);
 *
 * with the element-by-element steps of string instructions coalesced into
 * cache-line runs (see on_mem).
 *
 * Accesses to user addresses (copy_to_user and the like) and everything
 * user code does are not recorded: the direct map, the image and vmalloc
 * are all in the upper half.
 *
 * Windows. Accesses are counted in windows of `window` consecutive ones
 * (default 65536); every `sample`-th window is kept. The kept windows live
 * in one buffer of `limit` accesses; when it is full, every other kept
 * window is dropped and `sample` doubles. So a run of any length ends with
 * at most `limit` accesses in windows spread evenly over the whole capture,
 * each window an unbroken run of the kernel's accesses.
 *
 * On and off. `start=on` captures from the machine's first instruction
 * (a boot). The guest switches capture with a marker instruction its
 * helper `accmark` executes in user mode: the 8-byte no-op
 * `nopl 0x31464d44(%rax,%rax,1)` (on) or `...0x30464d44...` (off): its
 * displacement reads "DMF1"/"DMF0". The kernel's own padding no-ops have
 * a zero displacement.
 *
 * `seen` counts the accesses after coalescing; `coalesced` those left out.
 *
 * Output, written at exit: PREFIX.va (uint64 per access), PREFIX.kind
 * (uint8: bits 0-1 kind 0 load/1 store/2 fetch, bits 4-5 log2 of the
 * size), PREFIX.win (uint64 per kept window: its index since capture
 * began) and PREFIX.txt (key value lines: the counts, the final sample,
 * the marks as window indexes).
 *
 * The API used is QEMU's plugin API version 1 (QEMU 7.2, the one Debian
 * bookworm ships). Its header is not needed: the few declarations below
 * are written from its documentation. One vCPU only (the harness runs
 * -smp 1): the callbacks share state without locks.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- the plugin API (QEMU_PLUGIN_VERSION 1), as documented ---- */
typedef uint64_t qemu_plugin_id_t;
typedef uint32_t qemu_plugin_meminfo_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
typedef struct {
	const char *target_name;
	struct { int min; int cur; } version;
	bool system_emulation;
	union { struct { int smp_vcpus; int max_vcpus; } system; };
} qemu_info_t;
enum qemu_plugin_cb_flags { QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_CB_R_REGS,
			    QEMU_PLUGIN_CB_RW_REGS };
enum qemu_plugin_mem_rw { QEMU_PLUGIN_MEM_R = 1, QEMU_PLUGIN_MEM_W, QEMU_PLUGIN_MEM_RW };
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t, struct qemu_plugin_tb *);
typedef void (*qemu_plugin_vcpu_udata_cb_t)(unsigned int, void *);
typedef void (*qemu_plugin_vcpu_mem_cb_t)(unsigned int, qemu_plugin_meminfo_t, uint64_t,
					  void *);
typedef void (*qemu_plugin_udata_cb_t)(qemu_plugin_id_t, void *);

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t, qemu_plugin_vcpu_tb_trans_cb_t);
void qemu_plugin_register_vcpu_tb_exec_cb(struct qemu_plugin_tb *, qemu_plugin_vcpu_udata_cb_t,
					  enum qemu_plugin_cb_flags, void *);
void qemu_plugin_register_vcpu_insn_exec_cb(struct qemu_plugin_insn *,
					    qemu_plugin_vcpu_udata_cb_t,
					    enum qemu_plugin_cb_flags, void *);
void qemu_plugin_register_vcpu_mem_cb(struct qemu_plugin_insn *, qemu_plugin_vcpu_mem_cb_t,
				      enum qemu_plugin_cb_flags, enum qemu_plugin_mem_rw, void *);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t, qemu_plugin_udata_cb_t, void *);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *);
uint64_t qemu_plugin_tb_vaddr(const struct qemu_plugin_tb *);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *, size_t);
const void *qemu_plugin_insn_data(const struct qemu_plugin_insn *);
size_t qemu_plugin_insn_size(const struct qemu_plugin_insn *);
uint64_t qemu_plugin_insn_vaddr(const struct qemu_plugin_insn *);
unsigned int qemu_plugin_mem_size_shift(qemu_plugin_meminfo_t);
bool qemu_plugin_mem_is_store(qemu_plugin_meminfo_t);
void qemu_plugin_outs(const char *);

#define EXPORT __attribute__((visibility("default")))
EXPORT int qemu_plugin_version = 1;

/* ---- state ---- */
static const char *out_prefix;
static bool on;
static uint64_t window = 65536, sample = 1, limit = 16u << 20;
static uint64_t seen;          /* kernel accesses counted while on */
static uint64_t kept;          /* accesses in the buffer */
static uint64_t *buf_va;
static uint8_t *buf_kind;
static uint64_t *win_idx;      /* the kept windows' indexes */
static uint64_t nwin, max_win;
static bool in_window;         /* the current window is kept */
static uint64_t cur_window = UINT64_MAX;
static uint64_t marks_on, marks_off, decimations;
static char marks[4096];
static size_t marks_len;

static const uint8_t MARK[7] = { 0x0f, 0x1f, 0x84, 0x00, 0x44, 0x4d, 0x46 };

/* Drop every other kept window (the ones whose index is an odd multiple of
 * the current sample) and double the sample. */
static void decimate(void)
{
	uint64_t w, out = 0;

	for (w = 0; w < nwin; w++) {
		if ((win_idx[w] / sample) % 2)
			continue;
		if (out != w) {
			win_idx[out] = win_idx[w];
			memmove(buf_va + out * window, buf_va + w * window, window * 8);
			memmove(buf_kind + out * window, buf_kind + w * window, window);
		}
		out++;
	}
	nwin = out;
	kept = nwin * window;
	sample *= 2;
	decimations++;
}

static inline void put(uint64_t va, uint8_t kind)
{
	uint64_t w = seen / window;

	seen++;
	if (w != cur_window) {
		cur_window = w;
		in_window = (w % sample) == 0;
		if (in_window) {
			while (nwin == max_win) {
				decimate();
				in_window = (w % sample) == 0;
				if (!in_window)
					return;
			}
			win_idx[nwin++] = w;
		}
	}
	if (!in_window)
		return;
	buf_va[kept] = va;
	buf_kind[kept] = kind;
	kept++;
}

/* Coalescing (on unless coalesce=off). TCG runs a `rep movs`/`rep stos`
 * one element at a time, each iteration its block executed again: a 64 KiB
 * copy_from_user is 65,536 one-byte stores and as many fetches of the same
 * instruction, where the CPU's fast-string microcode moves whole cache
 * lines. A load or store that continues the previous one of its kind
 * (starts where it ended, in the same 64-byte line the run started in) is
 * not recorded, nor the re-fetch of the same block just before it. Every
 * access left out is a TLB hit on the page of the access just before it of
 * its kind, so the walks are unchanged; the access counts become counts of
 * cache-line runs. */
static bool coalesce = true;
static uint64_t coalesced;
static uint64_t last_end[2], last_line[2] = { UINT64_MAX, UINT64_MAX };
static uint64_t last_fetch = UINT64_MAX, pend_fetch;
static bool fetch_pending;

static inline void flush_fetch(void)
{
	if (fetch_pending) {
		put(pend_fetch, 2 | (3 << 4));
		last_fetch = pend_fetch;
		fetch_pending = false;
	}
}

static void on_mem(unsigned int vcpu, qemu_plugin_meminfo_t info, uint64_t va, void *ud)
{
	unsigned int shift;
	int k;

	(void)vcpu;
	(void)ud;
	if (!on || !(va >> 63))
		return;
	k = qemu_plugin_mem_is_store(info) ? 1 : 0;
	shift = qemu_plugin_mem_size_shift(info);
	if (coalesce && va == last_end[k] && (va >> 6) == last_line[k]) {
		last_end[k] = va + (1u << shift);
		if (fetch_pending && pend_fetch == last_fetch) {
			fetch_pending = false;
			coalesced++;
		}
		coalesced++;
		return;
	}
	flush_fetch();
	put(va, (uint8_t)k | (uint8_t)(shift << 4));
	last_end[k] = va + (1u << shift);
	last_line[k] = va >> 6;
}

static void on_fetch(unsigned int vcpu, void *ud)
{
	(void)vcpu;
	if (!on)
		return;
	if (!coalesce) {
		put((uint64_t)(uintptr_t)ud, 2 | (3 << 4));
		return;
	}
	flush_fetch();
	fetch_pending = true;
	pend_fetch = (uint64_t)(uintptr_t)ud;
}

static void on_mark(unsigned int vcpu, void *ud)
{
	bool to = ud != NULL;
	int n;

	(void)vcpu;
	if (to == on)
		return;
	flush_fetch();
	on = to;
	if (on)
		marks_on++;
	else
		marks_off++;
	/* where: the window the next access would fall in */
	if (marks_len < sizeof(marks) - 64) {
		n = snprintf(marks + marks_len, sizeof(marks) - marks_len, "mark %s %llu\n",
			     on ? "on" : "off", (unsigned long long)seen);
		if (n > 0)
			marks_len += (size_t)n;
	}
}

static void on_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
	size_t i, n = qemu_plugin_tb_n_insns(tb);
	uint64_t va = qemu_plugin_tb_vaddr(tb);

	(void)id;
	if (!(va >> 63)) {
		/* user code: only the marker matters */
		for (i = 0; i < n; i++) {
			struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
			const uint8_t *b = qemu_plugin_insn_data(insn);

			if (qemu_plugin_insn_size(insn) == 8 && !memcmp(b, MARK, 7)
			    && (b[7] == '0' || b[7] == '1'))
				qemu_plugin_register_vcpu_insn_exec_cb(
					insn, on_mark, QEMU_PLUGIN_CB_NO_REGS,
					b[7] == '1' ? (void *)1 : NULL);
		}
		return;
	}
	qemu_plugin_register_vcpu_tb_exec_cb(tb, on_fetch, QEMU_PLUGIN_CB_NO_REGS,
					     (void *)(uintptr_t)va);
	if (n) {
		uint64_t last = qemu_plugin_insn_vaddr(qemu_plugin_tb_get_insn(tb, n - 1));

		if ((last >> 12) != (va >> 12))
			qemu_plugin_register_vcpu_tb_exec_cb(tb, on_fetch, QEMU_PLUGIN_CB_NO_REGS,
							     (void *)(uintptr_t)last);
	}
	for (i = 0; i < n; i++)
		qemu_plugin_register_vcpu_mem_cb(qemu_plugin_tb_get_insn(tb, i), on_mem,
						 QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_MEM_RW, NULL);
}

static int write_file(const char *suffix, const void *data, size_t size)
{
	char path[4096];
	FILE *f;
	size_t done;

	snprintf(path, sizeof(path), "%s%s", out_prefix, suffix);
	f = fopen(path, "wb");
	if (!f)
		return -1;
	done = size ? fwrite(data, 1, size, f) : 0;
	return (fclose(f) == 0 && done == size) ? 0 : -1;
}

static void on_exit_cb(qemu_plugin_id_t id, void *ud)
{
	char txt[8192];
	int n;

	(void)id;
	(void)ud;
	if (on)
		flush_fetch();
	n = snprintf(txt, sizeof(txt),
		     "coalesced %llu\nseen %llu\nkept %llu\nwindows %llu\nwindow %llu\nsample %llu\n"
		     "limit %llu\ndecimations %llu\nmarks_on %llu\nmarks_off %llu\n%.*s",
		     (unsigned long long)coalesced, (unsigned long long)seen,
		     (unsigned long long)kept,
		     (unsigned long long)nwin, (unsigned long long)window,
		     (unsigned long long)sample, (unsigned long long)limit,
		     (unsigned long long)decimations, (unsigned long long)marks_on,
		     (unsigned long long)marks_off, (int)marks_len, marks);
	if (write_file(".va", buf_va, kept * 8) || write_file(".kind", buf_kind, kept)
	    || write_file(".win", win_idx, nwin * 8)
	    || write_file(".txt", txt, (size_t)(n > 0 ? n : 0)))
		qemu_plugin_outs("dmfrag capture: cannot write its output files\n");
}

static bool parse_u64(const char *v, uint64_t *out)
{
	char *end;
	unsigned long long x = strtoull(v, &end, 10);

	if (*v == 0 || *end != 0 || x == 0)
		return false;
	*out = x;
	return true;
}

EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc,
			       char **argv)
{
	int i;

	if (!info->system_emulation || info->system.smp_vcpus != 1) {
		qemu_plugin_outs("dmfrag capture: needs system emulation with one vCPU (-smp 1)\n");
		return -1;
	}
	for (i = 0; i < argc; i++) {
		const char *a = argv[i];
		const char *v = strchr(a, '=');
		bool ok = v != NULL;

		if (ok) {
			v++;
			if (!strncmp(a, "out=", 4))
				out_prefix = v;
			else if (!strncmp(a, "start=", 6))
				on = !strcmp(v, "on");
			else if (!strncmp(a, "coalesce=", 9))
				coalesce = strcmp(v, "off") != 0;
			else if (!strncmp(a, "limit=", 6))
				ok = parse_u64(v, &limit);
			else if (!strncmp(a, "window=", 7))
				ok = parse_u64(v, &window);
			else if (!strncmp(a, "sample=", 7))
				ok = parse_u64(v, &sample);
			else
				ok = false;
		}
		if (!ok) {
			qemu_plugin_outs("dmfrag capture: bad argument (out=PREFIX start=on|off "
					 "limit=N window=N sample=N coalesce=on|off)\n");
			return -1;
		}
	}
	if (!out_prefix) {
		qemu_plugin_outs("dmfrag capture: out=PREFIX is required\n");
		return -1;
	}
	max_win = limit / window;
	if (max_win < 2) {
		qemu_plugin_outs("dmfrag capture: limit must hold at least two windows\n");
		return -1;
	}
	limit = max_win * window;
	buf_va = malloc(limit * 8);
	buf_kind = malloc(limit);
	win_idx = malloc(max_win * 8);
	if (!buf_va || !buf_kind || !win_idx) {
		qemu_plugin_outs("dmfrag capture: cannot allocate its buffer\n");
		return -1;
	}
	qemu_plugin_register_vcpu_tb_trans_cb(id, on_trans);
	qemu_plugin_register_atexit_cb(id, on_exit_cb, NULL);
	return 0;
}
