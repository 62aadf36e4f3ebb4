/*
 * dmfrag_vfree: the guest face of the `vfree-reset:N` workload step.
 *
 * Writing "N SEED" to /sys/module/dmfrag_vfree/parameters/run makes N
 * vmalloc areas of 1, 2, 4 or 16 pages, each marked VM_FLUSH_RESET_PERMS
 * and made read-only with set_memory_ro (so its direct-map alias is made
 * read-only too: the CPA pattern of BPF images, module memory and kprobe
 * pages), and after each allocation frees one of the live areas with
 * probability 1/2 (vfree: vm_reset_perms sets the alias invalid, then
 * default). The areas left at the end stay allocated until the module is
 * removed. The plan comes from splitmix64 seeded with SEED, drawn exactly
 * as dmfrag.registry.vfree_reset_plan draws it, so the model makes the
 * same calls in the same order.
 *
 * set_memory_ro and find_vm_area are not exported to modules: their
 * addresses come from /proc/kallsyms as module parameters (the guest's
 * shell reads them), which leaves the kernel's own state untouched (a
 * kprobe on the symbol would register ftrace ops and may allocate a
 * trampoline: a CPA user of its own).
 *
 * Built by dmfrag.realkernel against Debian's linux-headers of each
 * reference kernel with the host's gcc.
 */
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/vmalloc.h>
#include <linux/kernel.h>
#include <linux/string.h>

#define MAX_LIVE 8192

static unsigned long set_memory_ro_addr;
module_param(set_memory_ro_addr, ulong, 0400);
MODULE_PARM_DESC(set_memory_ro_addr, "address of set_memory_ro (from /proc/kallsyms)");
static unsigned long find_vm_area_addr;
module_param(find_vm_area_addr, ulong, 0400);
MODULE_PARM_DESC(find_vm_area_addr, "address of find_vm_area (from /proc/kallsyms)");

static void *live[MAX_LIVE];
static unsigned int nlive;
static u64 rng_state;

static u64 splitmix64(void)
{
	u64 z = (rng_state += 0x9e3779b97f4a7c15ULL);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

typedef int (*set_memory_fn)(unsigned long addr, int numpages);
typedef struct vm_struct *(*find_vm_area_fn)(const void *addr);

static int run_plan(unsigned long n, unsigned long seed)
{
	static const int sizes[] = {1, 2, 4, 16};
	set_memory_fn set_ro = (set_memory_fn)set_memory_ro_addr;
	find_vm_area_fn find_area = (find_vm_area_fn)find_vm_area_addr;
	unsigned long i, allocs = 0, frees = 0, pages = 0;

	rng_state = seed;
	for (i = 0; i < n; i++) {
		int np = sizes[splitmix64() % 4];
		struct vm_struct *vm;
		void *p;

		if (nlive == MAX_LIVE) {
			pr_err("@@VFREE full: %u live areas\n", nlive);
			return -ENOSPC;
		}
		p = vmalloc((unsigned long)np * PAGE_SIZE);
		if (!p) {
			pr_err("@@VFREE vmalloc of %d pages failed at %lu\n", np, i);
			return -ENOMEM;
		}
		vm = find_area(p);
		if (vm)
			vm->flags |= VM_FLUSH_RESET_PERMS;
		set_ro((unsigned long)p, np);
		live[nlive++] = p;
		allocs++;
		pages += np;
		if (splitmix64() % 2 == 0) {
			unsigned int j = splitmix64() % nlive;

			vfree(live[j]);
			memmove(&live[j], &live[j + 1], (nlive - j - 1) * sizeof(live[0]));
			nlive--;
			frees++;
		}
	}
	pr_info("@@VFREE n=%lu seed=%lu allocs=%lu frees=%lu pages=%lu live=%u\n",
		n, seed, allocs, frees, pages, nlive);
	return 0;
}

static int run_set(const char *val, const struct kernel_param *kp)
{
	unsigned long n, seed;

	if (sscanf(val, "%lu %lu", &n, &seed) != 2)
		return -EINVAL;
	return run_plan(n, seed);
}

static const struct kernel_param_ops run_ops = {
	.set = run_set,
};
module_param_cb(run, &run_ops, NULL, 0200);
MODULE_PARM_DESC(run, "\"N SEED\": run the plan of N areas");

static int __init dmfrag_vfree_init(void)
{
	if (!set_memory_ro_addr || !find_vm_area_addr) {
		pr_err("dmfrag_vfree: set_memory_ro_addr and find_vm_area_addr are required\n");
		return -EINVAL;
	}
	return 0;
}

static void __exit dmfrag_vfree_exit(void)
{
	while (nlive)
		vfree(live[--nlive]);
}

module_init(dmfrag_vfree_init);
module_exit(dmfrag_vfree_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("dmfrag: read-only vmalloc areas freed with VM_FLUSH_RESET_PERMS");
